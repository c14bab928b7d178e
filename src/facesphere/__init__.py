"""facesphere: face recognition on the hypersphere.

Importing the package has no side effects: no process groups, no allocator tuning, no downloads.
"""

__version__ = "0.1.0"
