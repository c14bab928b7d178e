"""Re-export: re-cutting saved classifier shards lives with the objectives (:mod:`facesphere.objectives.resharding`)."""

from facesphere.objectives.resharding import reshard_classifier

__all__ = ["reshard_classifier"]
