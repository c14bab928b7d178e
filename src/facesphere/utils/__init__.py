"""Small cross-cutting utilities (allocator tuning, atomic files, logging, machine description)."""
