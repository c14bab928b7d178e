"""``facesphere train``, ``facesphere quickstart`` and ``facesphere config``."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Optional

import typer

from facesphere.cli.errors import user_errors

logger = logging.getLogger("facesphere")

OVERRIDE_HELP = "override a config field, e.g. --set optim.lr=0.05 --set train.steps=2000 (repeatable)"


def train(config: str = typer.Argument(..., help="YAML file or built-in config name (see `facesphere config --list`)"),
          overrides: list[str] = typer.Option([], "--set", "-s", help=OVERRIDE_HELP),
          resume: Optional[str] = typer.Option(None, "--resume", help="'latest' (this run's newest checkpoint) or a checkpoint path"),
          ) -> None:
    """Train a backbone with its objectives (default: one margin head); alone or under torchrun (gloo/NCCL)."""
    from facesphere.train.config import load_config
    from facesphere.train.distributed import shutdown_distributed
    from facesphere.train.trainer import Trainer

    with user_errors():
        cfg = load_config(config, overrides)
        trainer = Trainer(cfg)
        try:
            if resume is not None:
                trainer.resume(True if resume == "latest" else Path(resume))
            result = trainer.fit()
        finally:
            shutdown_distributed()
    if trainer.ctx.is_main:
        _report(result)


def _report(result) -> None:
    logger.info("trained %d steps in %.1f s (%.1f images/s); final loss %.4f", result.steps, result.wall_seconds,
                result.images_per_second, result.final_loss)
    if result.evaluation:
        ev = result.evaluation
        logger.info("held-out verification: accuracy %.2f%% ± %.2f on %d pairs of %d unseen identities",
                    100 * ev["accuracy_mean"], 100 * ev["accuracy_std"], ev["num_pairs"], ev["num_identities"])
        if "roc_plot" in ev:
            logger.info("ROC curve: %s", ev["roc_plot"])
    logger.info("checkpoint: %s", result.checkpoint)
    if result.tensorboard_dir is not None and result.tensorboard_dir.is_dir():
        logger.info("metrics: %s (and TensorBoard logs in %s)", result.run_dir / "metrics.csv", result.tensorboard_dir)
    else:
        logger.info("metrics: %s", result.run_dir / "metrics.csv")


def quickstart(output_dir: Path = typer.Option(Path("runs"), help="where the run folder is created"),
               steps: Optional[int] = typer.Option(None, help="training steps (default: the built-in config's)"),
               overrides: list[str] = typer.Option([], "--set", "-s", help=OVERRIDE_HELP)) -> None:
    """Generate synthetic identities, train MobileFaceNet + ArcFace on them, and verify on unseen identities.

    Needs no data and no downloads; a few minutes on two CPU cores.
    """
    from facesphere.train.config import load_config
    from facesphere.train.evaluation import evaluate_verification
    from facesphere.train.data_setup import build_eval_set
    from facesphere.train.trainer import Trainer

    started = time.perf_counter()
    extra = [f"output_dir={output_dir}"] + ([f"train.steps={steps}"] if steps else []) + list(overrides)
    with user_errors():
        cfg = load_config("quickstart", extra)
        trainer = Trainer(cfg)
        untrained = evaluate_verification(trainer.model.backbone, build_eval_set(cfg), cfg, trainer.ctx.device)
        logger.info("untrained network: held-out verification accuracy %.2f%%", 100 * untrained["accuracy_mean"])
        result = trainer.fit()
    _report(result)
    logger.info("quickstart finished in %.1f s: accuracy %.2f%% trained vs %.2f%% untrained",
                time.perf_counter() - started, 100 * result.evaluation["accuracy_mean"], 100 * untrained["accuracy_mean"])


def show_config(config: Optional[str] = typer.Argument(None, help="YAML file or built-in name; omit for the defaults"),
                overrides: list[str] = typer.Option([], "--set", "-s", help=OVERRIDE_HELP),
                list_builtin: bool = typer.Option(False, "--list", help="list the built-in configs")) -> None:
    """Print a config after validation and overrides (or list the built-in configs)."""
    from facesphere.train.config import builtin_config_names, dump_config, load_config

    if list_builtin:
        typer.echo("\n".join(builtin_config_names()))
        return
    with user_errors():
        typer.echo(dump_config(load_config(config, overrides)))
