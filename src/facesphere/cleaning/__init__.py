"""Label noise in labelled face sets (IMDb-Face, arXiv 1807.11649): find it, clean it, review it.

The paper separates two kinds of noise: *label flips* (a photo filed under the wrong person of the set)
and *outliers* (a photo of nobody in the set). This package profiles a set with an embedding model
(``profile``), writes cleaned list files and a report without touching a source image, and lets a person
confirm or reject what was flagged (``review``). ``noise`` holds the per-image status codes and the
controlled noise injection the benchmarks measure against.
"""
