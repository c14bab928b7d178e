"""Training: typed configs, schedules, atomic checkpoints, process groups and the loop itself."""

from facesphere.train.config import ConfigError, ExperimentConfig, load_config

__all__ = ["ConfigError", "ExperimentConfig", "load_config"]
