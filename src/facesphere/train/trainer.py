"""The training loop: backbone → outputs → objectives → named loss terms, on one process or many (torchrun).

The loop knows no paper. A batch is ``(images, targets)``, ``targets`` a dict of named tensors (with
``<name>_mask`` where only some samples carry a target). The backbone's outputs (``{"embedding": ...}``,
or the dict a backbone returns) go to every configured objective (:mod:`facesphere.objectives`), each
returning named loss terms; the loop minimises ``Σ weight · term`` and logs every term by name
(metrics.csv ``loss/<term>``, TensorBoard ``train/<term>``, the progress bar) beside the total ``loss``.
Before each step every objective's ``update(step)`` runs (annealing schedules). Replicated
objectives train inside DDP with the backbone; a ``sharded`` objective (Partial FC) runs outside it
with its own optimiser and schedule, and each rank saves its share in shard files that a resume on
any number of processes re-cuts. Data order and augmentation are pure functions of (seed, epoch,
index), and the checkpoint stores every RNG state, so ``resume`` continues a killed run step for step.
Checkpoints keep the backbone under ``model["backbone.*"]``, the run config under ``config`` and the
objectives' model-card fields (an age branch) under ``card``; a resume must continue the same experiment
(:mod:`facesphere.train.compat` says which settings may change). ``model.init`` fine-tunes: a stored model
of the configured backbone (or, for a backbone wrapping a recogniser, of that recogniser) is loaded into it before
step 0 (:func:`init_backbone`), never on a resume. Objectives that consult stored models (a teacher, a prior) read
them with the loader the trainer hands them (``ObjectiveContext.load_model``) when they are built; those models are
frozen and outside the checkpoints.
"""

from __future__ import annotations

import csv
import inspect
import json
import logging
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from facesphere.backbones import BACKBONES, Backbone, build_backbone
from facesphere.objectives import Objective, ObjectiveContext, build_objective
from facesphere.models.card import training_card
from facesphere.models.runs import latest_checkpoint, load_backbone, load_checkpoint
from facesphere.models.store import WeightMismatch, check_state_dict
from facesphere.train.checkpoint import (
    remove_partial_writes,
    rng_state,
    save_checkpoint,
    save_shard,
    set_rng_state,
    shard_path,
)
from facesphere.train.compat import check_resume
from facesphere.train.config import ExperimentConfig, dump_config
from facesphere.train.data_setup import build_eval_set, build_train_set
from facesphere.train.distributed import DistContext, all_reduce_mean, convert_batchnorm, init_distributed
from facesphere.train.schedules import build_scheduler
from facesphere.utils.files import atomic_path, atomic_write_text, check_writable
from facesphere.utils.machine import describe_machine

logger = logging.getLogger(__name__)


class FaceModel(nn.Module):
    """The backbone and the objectives (by key); :meth:`replicated` is what DDP wraps, sharded objectives stay out."""

    def __init__(self, backbone: Backbone, objectives: dict[str, Objective]) -> None:
        super().__init__()
        self.backbone = backbone
        self.objectives = nn.ModuleDict(objectives)

    def sharded(self) -> dict[str, Objective]:
        return {key: o for key, o in self.objectives.items() if o.sharded}

    def replicated(self) -> "Replicated":
        return Replicated(self.backbone, [o for o in self.objectives.values() if not o.sharded])


class Replicated(nn.Module):
    """The backbone and the replicated objectives: ``(images, targets) -> (outputs, terms)``."""

    def __init__(self, backbone: Backbone, objectives: list[Objective]) -> None:
        super().__init__()
        self.backbone = backbone
        self.objectives = nn.ModuleList(objectives)

    def forward(self, images: Tensor, targets: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        out = self.backbone(images)
        outputs = out if isinstance(out, dict) else {"embedding": out}
        return outputs, _terms(self.objectives, outputs, targets)


def _terms(objectives, outputs: dict[str, Tensor], targets: dict[str, Tensor],
           into: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    """Collect the objectives' named terms (into ``into``); a name returned twice is an error."""
    terms = {} if into is None else into
    for objective in objectives:
        for name, value in objective(outputs, targets).items():
            if name in terms:
                raise ValueError(f"two objectives return the loss term {name!r}; give them distinct labels")
            terms[name] = value
    return terms


def build_model(cfg: ExperimentConfig, num_classes: int, ctx: DistContext | None = None) -> FaceModel:
    """Backbone + the configured objectives; a sharded objective holds only this rank's share."""
    ctx = ctx or DistContext()
    backbone = build_backbone(cfg.model.backbone, **cfg.model.backbone_args)
    objectives = {}
    for o in cfg.resolved_objectives():
        context = ObjectiveContext(o.key, backbone.embedding_size, num_classes, cfg.seed, ctx.rank, ctx.world_size,
                                   load_model=_load_model)
        objectives[o.key] = build_objective(o.name, context, **o.args)
    return FaceModel(backbone, objectives)


def _load_model(path: str) -> tuple[nn.Module, Any]:
    """What objectives read stored models with (a teacher, a prior): (module on the CPU, its card)."""
    module, card, _ = load_backbone(path)
    return module, card


_LEGACY_KEY = "recognition"
"""Checkpoints written before objectives existed hold one recognition objective as ``head.*`` / ``partial_fc``."""


def _upgrade_checkpoint(state: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint of the single-head trainer in today's layout (``objectives.recognition.*``, ``sharded``)."""
    if any(k.startswith("head.") for k in state["model"]) or "partial_fc" in state:
        state = dict(state)
        state["model"] = {(f"objectives.{_LEGACY_KEY}.{k}" if k.startswith("head.") else k): v
                          for k, v in state["model"].items()}
        if "partial_fc" in state:
            old = state.pop("partial_fc")
            state["sharded"] = {"world_size": old["world_size"], "schedulers": {_LEGACY_KEY: old["scheduler"]}}
    return state


def _upgrade_shard(shard: dict[str, Any]) -> dict[str, Any]:
    return shard if "objectives" in shard else {"objectives": {_LEGACY_KEY: shard}}


class InitError(ValueError):
    """``model.init`` names weights that do not fit the configured backbone."""


def _resolved_args(name: str, args: dict[str, Any]) -> dict[str, Any]:
    """A backbone's constructor arguments with its defaults filled in (input size left out: the card checks it; so
    are the sizes inside a wrapper's nested arguments, e.g. ``recognizer_args``: the card's input and embedding
    sizes are the recogniser's)."""
    parameters = inspect.signature(BACKBONES.get(name)).parameters.values()
    resolved = {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty}
    resolved.update(args)
    resolved.pop("input_size", None)
    return {k: {n: x for n, x in v.items() if n not in ("input_size", "embedding_size")} if isinstance(v, dict) else v
            for k, v in resolved.items()}


def init_backbone(backbone: Backbone, cfg: ExperimentConfig) -> None:
    """Load ``model.init`` (model folder, imported weights, run or checkpoint) into ``backbone``, or refuse in one line.

    The stored model must be the configured backbone with the same arguments (defaults filled in), take the
    input the trainer feeds (size, colour order, normalisation: :func:`training_card`) and hold weights of
    exactly the backbone's names and shapes. A wrapper backbone that holds a recogniser (``.recognizer``, built
    from ``backbone_args.recognizer`` and ``recognizer_args``: a rectifier in front of it) may instead be given a
    stored model of that recogniser: it is loaded into ``.recognizer`` under the same checks against the
    recogniser's own name and arguments (the wrapper's other parts keep their initialisation).
    """
    path = cfg.model.init
    try:
        stored, card, described = load_backbone(path)
    except (FileNotFoundError, ValueError, RuntimeError) as error:  # CheckpointError, ModelCardMismatch, ...
        raise InitError(f"model.init {path}: {' '.join(str(error).split())}") from None
    target, name, args, what = backbone, cfg.model.backbone, cfg.model.backbone_args, "the configured backbone"
    wraps = isinstance(getattr(backbone, "recognizer", None), nn.Module)
    inner = _resolved_args(name, args).get("recognizer") if wraps else None
    if card.backbone != name and inner is not None and card.backbone == inner:
        target, name, args = backbone.recognizer, inner, dict(args.get("recognizer_args") or {})
        what = f"the {cfg.model.backbone!r} backbone's recogniser"
    problems = []
    if card.backbone != name:
        problems.append(f"it is a {card.backbone!r} backbone, the config trains {cfg.model.backbone!r}"
                        + (f" (recogniser {inner!r})" if inner is not None else ""))
    else:
        # the built size: a wrapper's embedding size is its recogniser's, not an argument of its own
        ours = _resolved_args(name, {**args, "embedding_size": int(target.embedding_size)})
        theirs = _resolved_args(card.backbone, {**card.backbone_args, "embedding_size": card.embedding_size})
        prefix = "backbone_args." if target is backbone else "backbone_args.recognizer_args."
        problems += [f"{prefix}{k} is {theirs.get(k)!r} there, {ours.get(k)!r} in the config"
                     for k in sorted(ours.keys() | theirs.keys()) if ours.get(k) != theirs.get(k)]
    problems += card.mismatches(training_card(target, cfg.name, name, args).input_spec)
    if not problems:
        try:
            check_state_dict(target, stored.state_dict(), "weights")
        except WeightMismatch as error:
            problems += error.problems
    if problems:
        raise InitError(f"model.init {path} does not fit {what}: {'; '.join(problems)}")
    target.load_state_dict(stored.state_dict())
    logger.info("%s initialised from %s %s (%s)", what, described["kind"], described["path"], card.name)


def _is_no_decay(name: str, parameter: nn.Parameter) -> bool:
    return parameter.ndim <= 1  # biases, norm scales/shifts, PReLU slopes, learned head scales


def build_optimizer(model: nn.Module, cfg: ExperimentConfig, prefix: str = "") -> torch.optim.Optimizer:
    """SGD/AdamW over ``model``'s parameters; all but the backbone's (names after ``prefix``) get the head's decay."""
    o = cfg.optim
    head_decay = o.weight_decay if o.head_weight_decay is None else o.head_weight_decay
    groups: dict[tuple[str, float], list[nn.Parameter]] = {}
    for name, parameter in model.named_parameters(prefix=prefix.rstrip(".")):
        if not parameter.requires_grad:
            continue
        decay = o.weight_decay if name.startswith("backbone.") else head_decay
        if o.no_decay_norm_and_bias and _is_no_decay(name, parameter):
            decay = 0.0
        groups.setdefault((name.split(".")[0], decay), []).append(parameter)
    param_groups = [{"params": ps, "weight_decay": decay} for (_, decay), ps in groups.items()]
    if o.name == "sgd":
        return torch.optim.SGD(param_groups, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov)
    return torch.optim.AdamW(param_groups, lr=o.lr, betas=o.betas)


def resolve_amp(setting: str, device: torch.device) -> torch.dtype | None:
    """auto: bf16 on CUDA when supported, else fp16 on CUDA, nothing on CPU (eager CPU bf16 training is slower here)."""
    if setting == "off":
        return None
    if setting == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if setting == "bf16" else torch.float16


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    final_loss: float
    wall_seconds: float
    images_per_second: float
    evaluation: dict[str, Any] = field(default_factory=dict)
    checkpoint: Path | None = None
    tensorboard_dir: Path | None = None  # set only when TensorBoard logs were written


class MetricsLog:
    """A CSV of metrics rows (rank 0), truncated to the resumed step so a resume never duplicates rows.

    The truncation rewrites the file atomically, and a row cut short by a kill (fields missing) ends the rows
    kept: rows up to the checkpoint's step were complete before the checkpoint was written."""

    TRAIN_FIELDS = ["step", "epoch", "loss", "lr", "images_per_second", "elapsed_seconds"]
    EVAL_FIELDS = ["step", "set", "accuracy_mean", "accuracy_std", "val_at_far"]

    def __init__(self, path: Path, fields: list[str], resume_step: int) -> None:
        self.path = path
        self.fields = fields
        rows: list[dict[str, str]] = []
        if resume_step > 0 and path.exists():
            with open(path, newline="") as handle:
                for row in csv.DictReader(handle):
                    if None in row.values() or not row["step"].isdigit() or int(row["step"]) > resume_step:
                        break
                    rows.append(row)
        with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)

    def write(self, row: dict[str, Any]) -> None:
        with open(self.path, "a", newline="") as handle:
            csv.DictWriter(handle, fieldnames=self.fields).writerow({k: "" if row.get(k) is None else row[k] for k in self.fields})


def read_metrics(path: Path) -> list[dict[str, float]]:
    """metrics.csv rows as floats; empty cells (a column added on a resume) are left out."""
    with open(path, newline="") as handle:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(handle)]


class Trainer:
    """Builds data, model, objectives, optimisers and schedules from an :class:`ExperimentConfig` and trains."""

    def __init__(self, cfg: ExperimentConfig, ctx: DistContext | None = None) -> None:
        self.cfg = cfg
        self.ctx = ctx or init_distributed(cfg.train.device)
        if cfg.data.batch_size % self.ctx.world_size:
            raise ValueError(f"global batch {cfg.data.batch_size} is not divisible by {self.ctx.world_size} processes")
        torch.manual_seed(cfg.seed)
        self.run_dir = check_writable(cfg.run_dir, folder=True)  # before minutes of data and model building
        self.checkpoint_dir = self.run_dir / "checkpoints"
        self.train_set, self.loader, self.sampler = build_train_set(cfg, self.ctx)
        self.model = build_model(cfg, self.train_set.num_classes, self.ctx)
        self.weights = {o.key: o.weight for o in cfg.resolved_objectives()}
        self._check_targets()
        if self.ctx.distributed and cfg.train.sync_batchnorm:
            self.model = convert_batchnorm(self.model, self.ctx.device)
        self.model.to(self.ctx.device)
        if cfg.train.channels_last:
            self.model.to(memory_format=torch.channels_last)
        reads = [o.reads for o in self.model.objectives.values()]
        if all(r is not None for r in reads):
            self.model.backbone.needed_outputs = frozenset().union(*reads)
        self.replicated = self.model.replicated()
        self.sharded = self.model.sharded()
        self._sharded_prefixes = tuple(f"objectives.{key}." for key in self.sharded)  # their keys in state dicts
        self.term_names = [name for objective in self.model.objectives.values() for name in objective.terms()]
        # Sharded objectives are rank-local: each has its own optimiser and schedule, outside DDP.
        self.optimizers = [build_optimizer(self.replicated, cfg)] + [
            build_optimizer(o, cfg, f"objectives.{key}.") for key, o in self.sharded.items()]
        self.schedulers = [build_scheduler(o, cfg.train.steps, cfg.schedule) for o in self.optimizers]
        self.optimizer, self.scheduler = self.optimizers[0], self.schedulers[0]
        self.amp_dtype = resolve_amp(cfg.train.amp, self.ctx.device)
        self.scaler = torch.amp.GradScaler(self.ctx.device.type, enabled=self.amp_dtype == torch.float16)
        self.step = 0
        self.config_history: list[dict[str, Any]] = []  # earlier configs of this run (see facesphere.train.compat)

    def _check_targets(self) -> None:
        """Every objective's targets must be among the data set's ``target_names`` (when it declares them): a missing
        one (an age objective on data without ages) is a one-line error before anything is written. Targets that no
        objective reads (ages under a plain recognition run) are ignored, and the log says so once."""
        offered = getattr(self.train_set, "target_names", None)
        if offered is None:
            return
        for key, objective in self.model.objectives.items():
            missing = [t for t in objective.requires if t not in offered]
            if missing:
                raise ValueError(f"objective {key!r} needs targets {missing}; data.kind {self.cfg.data.kind!r} gives "
                                 f"{sorted(offered)}")
        read = {t for objective in self.model.objectives.values() for t in objective.requires}
        unread = sorted(t for t in offered if t not in read)
        if unread and self.ctx.is_main:
            logger.info("the data gives targets %s that no objective reads: they are ignored", unread)

    # ----------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """The replicated state (rank 0 saves it); sharded objectives' parameters live in the shard files."""
        model = self.model.state_dict()
        state = {
            "model": {k: v for k, v in model.items() if not k.startswith(self._sharded_prefixes)},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng_state(),
            "config": self.cfg.model_dump(mode="json"),
            "config_history": self.config_history,
            "num_classes": self.train_set.num_classes,
            "card": self.card_fields(),
        }
        if self.sharded:
            state["sharded"] = {"world_size": self.ctx.world_size,
                                "schedulers": {key: s.state_dict() for key, s in zip(self.sharded, self.schedulers[1:])}}
        return state

    def card_fields(self) -> dict[str, Any]:
        """The objectives' model-card fields (e.g. ``age_branch``), saved with every checkpoint for export."""
        fields: dict[str, Any] = {}
        for objective in self.model.objectives.values():
            for name, value in objective.card_fields().items():
                if name in fields:
                    raise ValueError(f"two objectives set the model card's {name!r}; keep one")
                fields[name] = value
        return fields

    def shard_state(self) -> dict[str, Any]:
        """This rank's share of every sharded objective, with its optimiser state."""
        return {"objectives": {key: {**o.shard_state(), "optimizer": optimizer.state_dict()}
                               for (key, o), optimizer in zip(self.sharded.items(), self.optimizers[1:])}}

    def load_state_dict(self, state: dict[str, Any], shards: list[dict[str, Any]] | None = None) -> None:
        if state.get("num_classes") != self.train_set.num_classes:
            raise ValueError(f"checkpoint has {state.get('num_classes')} classes, the data has {self.train_set.num_classes}")
        saved = sorted(state.get("sharded", {}).get("schedulers", {}))
        if saved != sorted(self.sharded):
            raise ValueError(f"the checkpoint has sharded objectives {saved} (e.g. Partial FC), the config {sorted(self.sharded)}; "
                             "make them match (model.partial_fc.enabled for recognition)")
        missing, unexpected = self.model.load_state_dict(state["model"], strict=False)
        if unexpected or any(not k.startswith(self._sharded_prefixes) for k in missing):
            raise ValueError(f"checkpoint does not fit the model: missing {missing}, unexpected {unexpected}")
        for (key, objective), optimizer, scheduler in zip(self.sharded.items(), self.optimizers[1:], self.schedulers[1:]):
            objective.load_shards([s["objectives"][key] for s in shards or []], optimizer)
            scheduler.load_state_dict(state["sharded"]["schedulers"][key])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        self.step = int(state["step"])

    def resume(self, source: Path | str | bool = True) -> bool:
        """Load the latest checkpoint of this run (``True``) or a given path; False when there is none."""
        path = latest_checkpoint(self.checkpoint_dir) if source is True else Path(source)
        if path is None:
            logger.info("no checkpoint in %s: starting from scratch", self.checkpoint_dir)
            return False
        state = _upgrade_checkpoint(load_checkpoint(path, self.ctx.device))
        stored, step = state.get("config"), int(state["step"])
        if stored is None:
            logger.warning("%s holds no config: the resume cannot check that it continues the same experiment", path)
            changes = {}
        else:
            changes = check_resume(stored, self.cfg, step, str(path))
        shards = None
        if "sharded" in state:
            saved_world = int(state["sharded"]["world_size"])
            shards = [_upgrade_shard(load_checkpoint(shard_path(path.parent, step, r, saved_world),
                                                     self.ctx.device)) for r in range(saved_world)]
        self.load_state_dict(state, shards)
        if self.ctx.is_main and source is True:  # only once the resume is accepted: a refused one changes nothing
            remove_partial_writes(self.checkpoint_dir)
        self.config_history = list(state.get("config_history", [])) + (
            [{"until_step": step, "config": stored}] if changes else [])
        logger.info("resumed from %s at step %d", path, self.step)
        return True

    def save(self) -> Path | None:
        """Shards first (every rank), then the main file (rank 0): a main file always has its shards."""
        if self.sharded:
            save_shard(self.checkpoint_dir, self.step, self.ctx.rank, self.ctx.world_size, self.shard_state())
            self._barrier()
        path = None
        if self.ctx.is_main:
            path = save_checkpoint(self.checkpoint_dir, self.step, self.state_dict(), self.cfg.train.keep_checkpoints)
        self._barrier()
        return path

    def _barrier(self) -> None:
        if self.ctx.distributed:
            torch.distributed.barrier()

    # ----------------------------------------------------------------------------------------------- loop
    def _batches(self):
        per_epoch = len(self.sampler)
        if per_epoch == 0:
            raise ValueError("the dataset is smaller than one global batch")
        epoch, offset = divmod(self.step, per_epoch)
        while True:
            self.sampler.set_epoch(epoch)
            self.sampler.set_start_batch(offset)
            self.train_set.set_epoch(epoch)
            for batch in self.loader:
                yield epoch, batch
            epoch, offset = epoch + 1, 0

    def _wrap(self, module: nn.Module) -> nn.Module:
        """DDP (and compile) around the replicated part; sharded objectives are called outside it."""
        if self.ctx.distributed:
            module = DistributedDataParallel(module, device_ids=[self.ctx.device.index] if self.ctx.device.type == "cuda" else None,
                                             find_unused_parameters=self.cfg.train.find_unused_parameters)
        if self.cfg.train.compile:
            module = torch.compile(module)
        return module

    def _total(self, terms: dict[str, Tensor]) -> Tensor:
        """Σ weight · term over every objective's terms (a weight of 1 multiplies exactly)."""
        if terms.keys() != set(self.term_names):
            raise ValueError(f"the objectives returned the terms {sorted(terms)}, but declare {sorted(self.term_names)} "
                             "in terms()")
        total = None
        for key, objective in self.model.objectives.items():
            for name in objective.terms():
                weighted = terms[name] * self.weights[key]
                total = weighted if total is None else total + weighted
        return total

    def fit(self) -> TrainResult:
        cfg, ctx = self.cfg, self.ctx
        if self.step == 0 and cfg.model.init is not None:  # a resume continues from its checkpoint instead
            init_backbone(self.model.backbone, cfg)
        if ctx.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.run_dir / "config.yaml", dump_config(cfg))
            atomic_write_text(self.run_dir / "machine.json", json.dumps(describe_machine(), indent=2, default=str))
        names = self.term_names
        fields = MetricsLog.TRAIN_FIELDS[:3] + [f"loss/{n}" for n in names] + MetricsLog.TRAIN_FIELDS[3:]
        metrics = MetricsLog(self.run_dir / "metrics.csv", fields, self.step) if ctx.is_main else None
        if ctx.is_main and cfg.eval.protocols:
            self.eval_log = MetricsLog(self.run_dir / "eval_metrics.csv", MetricsLog.EVAL_FIELDS, self.step)
        writer = self._tensorboard() if ctx.is_main else None
        module = self._wrap(self.replicated)
        self.model.train()
        module.train()
        sharded = list(self.sharded.values())
        device_type = ctx.device.type
        start_step, start_time = self.step, time.perf_counter()
        window_time, window_images = start_time, 0
        loss_value = math.nan
        progress = _Progress(cfg.train.steps, start_step, enabled=ctx.is_main and cfg.train.progress)
        try:
            for epoch, (images, targets) in self._batches():
                if self.step >= cfg.train.steps:
                    break
                images = images.to(ctx.device, non_blocking=True)
                targets = {k: v.to(ctx.device, non_blocking=True) for k, v in targets.items()}
                if cfg.train.channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                for objective in self.model.objectives.values():
                    objective.update(self.step)
                autocast = torch.autocast(device_type, dtype=self.amp_dtype) if self.amp_dtype else nullcontext()
                with autocast:
                    outputs, terms = module(images, targets)
                    _terms(sharded, outputs, targets, into=terms)
                loss = self._total(terms)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"loss became {loss.item()} at step {self.step}; lower the lr or check the data")
                for optimizer in self.optimizers:
                    optimizer.zero_grad(set_to_none=True)
                self.scaler.scale(loss).backward()
                if cfg.train.grad_clip:
                    # Sharded objectives are not clipped: their parameters' norm is spread over ranks.
                    self.scaler.unscale_(self.optimizer)
                    nn.utils.clip_grad_norm_(self.replicated.parameters(), cfg.train.grad_clip)
                for optimizer in self.optimizers:
                    self.scaler.step(optimizer)
                self.scaler.update()
                lr = self.optimizer.param_groups[0]["lr"]
                for scheduler in self.schedulers:
                    scheduler.step()
                self.step += 1
                window_images += images.shape[0] * ctx.world_size
                if self.step % cfg.train.log_every == 0 or self.step == cfg.train.steps:
                    loss_value = all_reduce_mean(loss.detach().float(), ctx).item()
                    values = {n: all_reduce_mean(terms[n].detach().float(), ctx).item() for n in names}
                    now = time.perf_counter()
                    speed = window_images / max(now - window_time, 1e-9)
                    window_time, window_images = now, 0
                    if metrics is not None:
                        metrics.write({"step": self.step, "epoch": epoch, "loss": f"{loss_value:.8f}", "lr": f"{lr:.8g}",
                                       "images_per_second": f"{speed:.2f}", "elapsed_seconds": f"{now - start_time:.3f}",
                                       **{f"loss/{n}": f"{v:.8f}" for n, v in values.items()}})
                    if writer is not None:
                        writer.add_scalar("train/loss", loss_value, self.step)
                        for n, v in values.items():
                            writer.add_scalar(f"train/{n}", v, self.step)
                        writer.add_scalar("train/lr", lr, self.step)
                        writer.add_scalar("train/images_per_second", speed, self.step)
                    progress.update(self.step, loss_value, lr, speed, values if len(values) > 1 else {})
                if self.step % cfg.train.checkpoint_every == 0 and self.step < cfg.train.steps:
                    self.save()
                if cfg.eval.enabled and cfg.eval.every_steps and self.step % cfg.eval.every_steps == 0 and self.step < cfg.train.steps:
                    self._evaluate(writer, plot=False)
                    module.train()
        finally:
            progress.close()
        wall = time.perf_counter() - start_time
        checkpoint = self.save()
        trained_images = (self.step - start_step) * cfg.data.batch_size
        result = TrainResult(self.run_dir, self.step, loss_value, wall, trained_images / max(wall, 1e-9), checkpoint=checkpoint,
                             tensorboard_dir=Path(writer.log_dir) if writer is not None else None)
        if cfg.eval.enabled:
            result.evaluation = self._evaluate(writer, plot=True)
        if writer is not None:
            writer.close()
        return result

    def _tensorboard(self):
        if not self.cfg.train.tensorboard:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is a dependency, but a broken install should not stop training
            logger.warning("tensorboard is not importable; metrics go to metrics.csv only")
            return None
        return SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))

    def _evaluate(self, writer, plot: bool) -> dict[str, Any]:
        """Verification on held-out synthetic identities (rank 0); others wait."""
        report: dict[str, Any] = {}
        if self.ctx.is_main:
            from facesphere.train.evaluation import evaluate_verification

            report = evaluate_verification(self.model.backbone, build_eval_set(self.cfg), self.cfg, self.ctx.device,
                                           self.run_dir if plot else None, self.amp_dtype)
            report["step"] = self.step
            if writer is not None:
                writer.add_scalar("eval/accuracy", report["accuracy_mean"], self.step)
            logger.info("step %d held-out verification accuracy %.4f ± %.4f", self.step, report["accuracy_mean"], report["accuracy_std"])
            if self.cfg.eval.protocols:
                report["protocols"] = self._evaluate_protocols(writer, plot)
            if plot:
                atomic_write_text(self.run_dir / "evaluation.json", json.dumps(report, indent=2, default=str))
        self._barrier()
        return report

    def _evaluate_protocols(self, writer, plot: bool) -> dict[str, Any]:
        """The configured protocol runs (``eval.protocols``) with the backbone's own card; rank 0 only.

        Each run is logged, written to TensorBoard (``eval/<label>/...``) and appended to
        ``eval_metrics.csv``; plots go to ``eval/<label>/`` at the end.
        """
        from facesphere.evaluate.model_input import evaluate_with_card
        from facesphere.models.card import training_card

        backbone = self.model.backbone
        card = training_card(backbone, f"{self.cfg.name}-step{self.step}", self.cfg.model.backbone,
                             self.cfg.model.backbone_args)
        results, rows = {}, []
        for run in self.cfg.eval.protocols:
            out_dir = self.run_dir / "eval" / run.key if plot else None
            result = evaluate_with_card(backbone, card, run.name, run.path, run.options, flip=self.cfg.eval.flip,
                                        batch_size=self.cfg.eval.batch_size, device=self.ctx.device,
                                        amp_dtype=self.amp_dtype, out_dir=out_dir)
            results[run.key] = result
            val = (result.get("val_at_far") or {}).get("val_mean")
            row = {"step": self.step, "set": run.key, "accuracy_mean": result.get("accuracy_mean"),
                   "accuracy_std": result.get("accuracy_std"), "val_at_far": val}
            rows.append(row)
            for name in ("accuracy_mean", "val_at_far"):
                if writer is not None and isinstance(row[name], float):
                    writer.add_scalar(f"eval/{run.key}/{name}", row[name], self.step)
            logger.info("step %d %s: %s", self.step, run.key,
                        ", ".join(f"{k} {v:.4f}" for k, v in row.items() if isinstance(v, float)) or "no accuracy")
        for row in rows:
            self.eval_log.write(row)
        return results


class _Progress:
    """A rich progress bar with the loss (and each term when there are several), lr and images/s on a terminal;
    periodic log lines otherwise."""

    def __init__(self, total: int, start: int, enabled: bool) -> None:
        self.enabled = enabled
        self.progress = None
        self.last_log = time.perf_counter()
        if not enabled:
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        console = Console(stderr=True)
        if console.is_terminal:
            self.progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                                     TextColumn("{task.fields[status]}"), console=console)
            self.task = self.progress.add_task("train", total=total, completed=start, status="")
            self.progress.start()

    def update(self, step: int, loss: float, lr: float, speed: float, terms: dict[str, float] | None = None) -> None:
        if not self.enabled:
            return
        parts = "".join(f"  {name} {value:.4f}" for name, value in (terms or {}).items())
        status = f"loss {loss:.4f}{parts}  lr {lr:.4g}  {speed:.0f} img/s"
        if self.progress is not None:
            self.progress.update(self.task, completed=step, status=status)
        elif time.perf_counter() - self.last_log > 10:
            self.last_log = time.perf_counter()
            logger.info("step %d  %s", step, status)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
