"""Typed training configuration: YAML validated into pydantic models, with dotted command-line overrides.

``load_config("configs/arcface.yaml", ["optim.lr=0.05", "train.steps=2000"])`` reads the file, applies
each override by the same field names the YAML uses, and validates the result; a typo or a wrong type
is an error naming the field, never a silently ignored key.
"""

from __future__ import annotations

import importlib
import inspect
from importlib import resources
from pathlib import Path
import types
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from facesphere.utils.files import read_text_checked
from facesphere.utils.overrides import apply_overrides, load_yaml

MAX_CONFIG_BYTES = 4 << 20  # a config is a page of YAML; a larger file is a wrong path, not a config


class Strict(BaseModel):
    """Unknown keys are errors, and booleans are never numbers: pydantic would read ``batch_size: true`` as 1 and
    ``flip: 1`` as true. A boolean field takes only true/false; a number field (also inside lists and tuples)
    refuses true/false. Numbers keep pydantic's conversions (``lr: 1`` is 1.0, ``steps: 1e4`` via ``--set`` is
    10000; ``steps: 1.5`` is refused)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @field_validator("*", mode="before")
    @classmethod
    def _booleans_are_not_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        annotation = cls.model_fields[info.field_name].annotation
        if not _fits_booleans(annotation, value):
            raise ValueError(f"expected true or false, got {value!r}" if annotation is bool
                             else f"a boolean ({str(value).lower()}) is not a valid value here" if isinstance(value, bool)
                             else f"booleans are not numbers, got {value!r}")
        return value


def _fits_booleans(annotation: Any, value: Any) -> bool:
    """False when ``value`` puts a boolean where ``annotation`` wants anything else, or a non-boolean where it
    wants a bool (looking inside lists and tuples); every other check is pydantic's."""
    origin, args = get_origin(annotation), get_args(annotation)
    if annotation is Any:
        return True
    if origin is Annotated:
        return _fits_booleans(args[0], value)
    if origin in (Union, types.UnionType):
        return any(_fits_booleans(a, value) for a in args)
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    if origin in (list, tuple) and isinstance(value, (list, tuple)) and args:
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            return all(_fits_booleans(a, v) for a, v in zip(args, value))
        return all(_fits_booleans(args[0], v) for v in value)
    return True


class PartialFCSettings(Strict):
    """Partial FC (arXiv 2203.15565): class centres sharded across processes, negatives sampled at ``sample_rate``."""

    enabled: bool = False
    sample_rate: float = Field(1.0, gt=0, le=1, description="share of each shard's centres used per step "
                               "(positives always kept)")


class ModelConfig(Strict):
    backbone: str = "mobilefacenet"
    backbone_args: dict[str, Any] = Field(default_factory=dict)
    head: str = "arcface"
    head_args: dict[str, Any] = Field(default_factory=dict)
    partial_fc: PartialFCSettings = Field(default_factory=PartialFCSettings)
    init: Path | None = Field(None, description="fine-tune: start the backbone from this model folder, imported "
                              "weights folder, run folder or checkpoint (read at step 0 only; a resume continues "
                              "from its checkpoint). Its backbone, arguments, input and weights' shapes must "
                              "match model.backbone and model.backbone_args; for a backbone wrapping a recogniser "
                              "(gridface, stn) it may instead be a model of backbone_args.recognizer (with "
                              "recognizer_args), loaded into the recogniser")

    @model_validator(mode="after")
    def _known_components(self) -> "ModelConfig":
        from facesphere.backbones import BACKBONES
        from facesphere.heads import HEADS

        for registry, name, kwargs in ((BACKBONES, self.backbone, self.backbone_args), (HEADS, self.head, self.head_args)):
            try:
                constructor = registry.get(name)
            except KeyError as error:
                raise ValueError(str(error.args[0])) from None
            _check_kwargs(constructor, kwargs, f"{registry.kind} {name!r}")
        return self


_BUILT_BY_TRAINER = ("embedding_size", "num_classes", "context")


def _check_kwargs(constructor, kwargs: dict[str, Any], what: str) -> None:
    parameters = inspect.signature(constructor).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return
    unknown = sorted(set(kwargs) - set(parameters))
    if unknown:
        accepted = ", ".join(p for p in parameters if p not in _BUILT_BY_TRAINER or what.startswith("backbone"))
        raise ValueError(f"{what} does not take {unknown}; it accepts: {accepted}")


class ObjectiveConfig(Strict):
    """One training objective (:mod:`facesphere.objectives`): a registered name or ``"package.module:Class"``,
    its loss weight and constructor ``args``; ``label`` names its terms (default: the registered name, or the
    class name in lower case for an import path).

    The ``recognition`` objective's ``head`` (with ``head_args``), ``partial_fc`` and ``sample_rate`` default
    to ``model.head``, ``model.head_args`` and ``model.partial_fc``."""

    name: str
    weight: float = Field(1.0, ge=0)
    args: dict[str, Any] = Field(default_factory=dict)
    label: str | None = None

    @field_validator("name")
    @classmethod
    def _canonical_name(cls, value: str) -> str:
        return value if ":" in value else value.lower()  # registry names are case-insensitive

    @model_validator(mode="after")
    def _known_objective(self) -> "ObjectiveConfig":
        from facesphere.objectives import resolve_objective

        try:
            constructor = resolve_objective(self.name)
        except KeyError as error:
            raise ValueError(str(error.args[0])) from None
        _check_kwargs(constructor, self.args, f"objective {self.name!r}")
        if self.key in ("", "loss") or "/" in self.key or "," in self.key:
            raise ValueError(f"objective label {self.key!r} cannot name a metrics column; give a plain label")
        return self

    @property
    def key(self) -> str:
        return self.label or self.name.rpartition(":")[2].lower()


class AugmentSettings(Strict):
    flip: float = Field(0.5, ge=0, le=1)
    scale: tuple[float, float] = (1.0, 1.0)
    translate: float = Field(0.0, ge=0, le=0.5)
    brightness: float = Field(0.0, ge=0)
    contrast: float = Field(0.0, ge=0)
    saturation: float = Field(0.0, ge=0)
    misalign: str = Field("none", description="none, mild, medium or strong: jitter each training sample by a "
                          "random similarity + perspective homography up to this level (facesphere.data.misalign); "
                          "the data set then gives the un-jittered image as the 'aligned' target")
    misalign_share: float = Field(1.0, ge=0, le=1, description="share of the samples misaligned (the others' input "
                                  "equals their aligned target)")

    @field_validator("misalign")
    @classmethod
    def _known_level(cls, value: str) -> str:
        from facesphere.data.misalign import get_strength

        get_strength(value)
        return value


class SyntheticSettings(Strict):
    num_identities: int = Field(200, ge=2)
    samples_per_identity: int = Field(20, ge=2)
    seed: int = 0
    difficulty: float = Field(1.0, ge=0)
    identity_offset: int = Field(0, ge=0)
    targets: list[Literal["pose", "age"]] = Field(default_factory=list, description="targets besides the label: pose "
                                                  "(normalised roll, yaw, pitch of the rendered face; needs augment.flip=0), "
                                                  "age (years; faces are then rendered aged, held-out identities too)")
    target_share: float = Field(1.0, ge=0, le=1, description="share of samples carrying those targets (the rest "
                                "are masked out), chosen by (seed, index)")
    age_min: float = Field(10.0, ge=0, le=150, description="with the age target: youngest age rendered (years)")
    age_max: float = Field(70.0, ge=0, le=150, description="with the age target: oldest age rendered (years)")
    age_span: float | None = Field(None, ge=0, description="with the age target: each identity's ages are uniform in "
                                   "a window of this many years placed at random in [age_min, age_max]; null: the "
                                   "whole range")

    @model_validator(mode="after")
    def _age_range(self) -> "SyntheticSettings":
        if self.age_min > self.age_max:
            raise ValueError(f"age_min ({self.age_min}) must not exceed age_max ({self.age_max})")
        return self

    def age_options(self) -> dict:
        """``SyntheticFaces`` keywords for the rendered ages: none unless ``age`` is a target."""
        if "age" not in self.targets:
            return {}
        return {"age_range": (self.age_min, self.age_max), "age_span": self.age_span}


class DataConfig(Strict):
    kind: str = Field("synthetic", description="a registered data kind (facesphere.train.data_setup.DATA_KINDS): "
                      "synthetic, folder, list, record")
    root: Path | None = Field(None, description="folder: the image folder; record: the folder holding train.rec/.idx "
                              "(or the .rec itself); list: the base of relative paths")
    list_file: Path | None = None
    ages: Literal["none", "side_file", "fgnet_names"] = Field(
        "none", description="folder: where the images' ages (the 'age' target) come from: none; side_file = "
        "'ages.csv' in the root (header 'path,age', then 'relative/path,age' lines; '-' or an unlisted image: no "
        "age); fgnet_names = FG-NET's 'SSSAyy[x].JPG' names (subject SSS at age yy; other names: no age). Images "
        "without an age are masked out of age losses. list and record sets carry their own ages (a "
        "'# columns: path label age' header; an [identity, age] record label), so this stays 'none' for them")
    image_size: tuple[int, int] | None = None
    synthetic: SyntheticSettings = Field(default_factory=SyntheticSettings)
    augment: AugmentSettings = Field(default_factory=AugmentSettings)
    batch_size: int = Field(128, ge=1, description="global batch size, split across processes")
    num_workers: int = Field(2, ge=0)

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, value: str) -> str:
        from facesphere.train.data_setup import DATA_KINDS

        return _registered(DATA_KINDS, value)

    @model_validator(mode="after")
    def _paths(self) -> "DataConfig":
        if self.kind == "folder" and self.root is None:
            raise ValueError("data.kind 'folder' needs data.root")
        if self.kind == "record" and self.root is None:
            raise ValueError("data.kind 'record' needs data.root (the folder with train.rec, or the .rec file)")
        if self.kind == "list" and self.list_file is None:
            raise ValueError("data.kind 'list' needs data.list_file")
        if self.ages != "none" and self.kind != "folder":
            raise ValueError(f"data.ages {self.ages!r} is for data.kind 'folder'; a {self.kind!r} set carries its own ages")
        return self


def _registered(registry, name: str):
    """``name`` if ``registry`` knows it, else a ValueError listing the known names (pydantic names the field)."""
    try:
        registry.get(name)
    except KeyError as error:
        raise ValueError(str(error.args[0])) from None
    return name


def _require_distinct(keys: list[str], field: str) -> None:
    if len(set(keys)) != len(keys):
        raise ValueError(f"{field}: give repeated entries distinct labels, got {keys}")


class ProtocolRun(Strict):
    """A registered evaluation protocol run on ``path`` during training, as ``facesphere eval`` would run it.

    ``options`` are the protocol's own (e.g. ``pairs``, ``n_folds``, ``center_crop``); flip and batch
    size come from the eval section. ``label`` names the results (default: the protocol name).
    """

    name: str
    path: Path
    options: dict[str, Any] = Field(default_factory=dict)
    label: str | None = None

    @field_validator("name")
    @classmethod
    def _known_protocol(cls, value: str) -> str:
        from facesphere.evaluate.protocols import PROTOCOLS

        return _registered(PROTOCOLS, value)

    @field_validator("label")
    @classmethod
    def _plain_label(cls, value: str | None) -> str | None:
        if value is not None and (not value or "/" in value or value.startswith(".")):
            raise ValueError("label must be a plain folder name (results go to <run>/eval/<label>/)")
        return value

    @property
    def key(self) -> str:
        return self.label or self.name


class EvalConfig(Strict):
    """Held-out verification on synthetic identities disjoint from the training ones, plus optional protocol runs."""

    enabled: bool = True
    num_identities: int = Field(100, ge=2)
    samples_per_identity: int = Field(10, ge=2)
    identity_offset: int = Field(1_000_000, ge=0)
    pairs: int = Field(3000, ge=20, description="genuine + impostor pairs, half each")
    every_steps: int = Field(0, ge=0, description="0: only at the end")
    flip: bool = True
    batch_size: int = Field(256, ge=1)
    protocols: list[ProtocolRun] = Field(default_factory=list, description="protocol runs evaluated with the "
                                         "held-out set (every_steps and at the end)")

    @model_validator(mode="after")
    def _unique_labels(self) -> "EvalConfig":
        _require_distinct([run.key for run in self.protocols], "eval.protocols")
        return self


class OptimConfig(Strict):
    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.1, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = False
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = Field(5e-4, ge=0)
    head_weight_decay: float | None = Field(None, ge=0, description="defaults to weight_decay")
    no_decay_norm_and_bias: bool = True


class ScheduleConfig(Strict):
    kind: Literal["cosine", "step", "poly", "constant"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    warmup_start_factor: float = Field(0.0, ge=0, le=1)
    milestones: list[int] = Field(default_factory=list, description="step schedule: steps where lr is multiplied by gamma")
    gamma: float = Field(0.1, gt=0)
    power: float = Field(2.0, gt=0, description="poly schedule exponent")
    min_lr_factor: float = Field(0.0, ge=0, le=1)


class TrainConfig(Strict):
    steps: int = Field(1000, ge=1)
    grad_clip: float | None = Field(None, gt=0, description="max global gradient norm")
    amp: Literal["auto", "off", "bf16", "fp16"] = "auto"
    device: str = "auto"
    channels_last: bool = False
    compile: bool = False
    sync_batchnorm: bool = True
    find_unused_parameters: bool = Field(False, description="under torchrun: let DDP skip parameters no loss term "
                                         "reaches (a backbone output that no objective reads); costs a graph walk "
                                         "per step")
    log_every: int = Field(10, ge=1)
    checkpoint_every: int = Field(200, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    tensorboard: bool = True
    progress: bool = True


class ExperimentConfig(Strict):
    name: str = "experiment"
    output_dir: Path = Path("runs")
    seed: int = 0
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    objectives: list[ObjectiveConfig] = Field(default_factory=list, description="what training minimises; empty: "
                                              "one recognition objective (model.head, model.partial_fc)")
    plugins: list[str] = Field(default_factory=list, description="modules imported before the config is validated "
                               "(in every process), whose registrations (backbones, heads, objectives, data kinds) "
                               "the config may then name")

    @model_validator(mode="after")
    def _unique_objectives(self) -> "ExperimentConfig":
        from facesphere.heads import HEADS

        _require_distinct([o.key for o in self.objectives], "objectives")
        for o in self.resolved_objectives():
            if o.name == "recognition" and "head" in o.args:
                try:
                    constructor = HEADS.get(o.args["head"])
                except KeyError as error:
                    raise ValueError(f"objectives ({o.key}): {error.args[0]}") from None
                _check_kwargs(constructor, o.args.get("head_args") or {}, f"head {o.args['head']!r}")
        return self

    def resolved_objectives(self) -> list[ObjectiveConfig]:
        """The objectives to train; the recognition objective's ``head`` (with ``head_args``), ``partial_fc`` and
        ``sample_rate`` default to ``model.head``, ``model.head_args`` and ``model.partial_fc``."""
        m = self.model
        objectives = self.objectives or [ObjectiveConfig(name="recognition")]
        resolved = []
        for o in objectives:
            if o.name == "recognition":
                head = {} if "head" in o.args else {"head": m.head, "head_args": m.head_args}
                defaults = {**head, "partial_fc": m.partial_fc.enabled, "sample_rate": m.partial_fc.sample_rate}
                o = o.model_copy(update={"args": {**defaults, **o.args}})
            resolved.append(o)
        return resolved

    @field_validator("name")
    @classmethod
    def _safe_name(cls, value: str) -> str:
        if not value or "/" in value or value.startswith("."):
            raise ValueError("name must be a plain folder name")
        return value

    @property
    def run_dir(self) -> Path:
        return self.output_dir / self.name


class ConfigError(ValueError):
    """A configuration file or override that cannot be used; the message names the field."""


def builtin_config_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("facesphere.configs").iterdir() if p.name.endswith(".yaml"))


def _read_yaml(source: str | Path) -> dict[str, Any]:
    path = Path(source)
    if not path.exists() and not path.suffix and str(source) in builtin_config_names():
        text = resources.files("facesphere.configs").joinpath(f"{source}.yaml").read_text()
    elif path.is_dir():
        raise ConfigError(f"config {str(source)!r} is a directory, not a YAML file")
    elif path.exists():
        try:
            text = read_text_checked(path, MAX_CONFIG_BYTES)
        except ValueError as error:  # too large, or not UTF-8
            raise ConfigError(str(error)) from None
    else:
        raise ConfigError(f"config {str(source)!r} is neither a file nor a built-in ({', '.join(builtin_config_names())})")
    try:
        data = load_yaml(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"{source}: not valid YAML: {error}") from None
    if data is None:  # an empty file, or only comments: surely not meant as "all defaults"
        raise ConfigError(f"{source}: the config file holds no settings (a built-in name, e.g. quickstart, gives defaults)")
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping")
    return data


def apply_override(data: dict[str, Any], override: str) -> None:
    """Apply one ``a.b.c=value`` override in place (``facesphere.utils.overrides``)."""
    try:
        apply_overrides(data, [override])
    except ValueError as error:
        raise ConfigError(str(error)) from None


def import_plugins(modules: list[str]) -> None:
    """Import the config's ``plugins`` (a researcher's own backbones, objectives, data kinds register there)."""
    if not isinstance(modules, list) or not all(isinstance(m, str) for m in modules):
        raise ConfigError(f"plugins must be a list of module names, got {modules!r}")
    for module in modules:
        try:
            importlib.import_module(module)
        except Exception as error:  # any failure inside the user's module is reported by the module's name
            raise ConfigError(f"plugins: cannot import {module!r}: {type(error).__name__}: {error}") from None


def load_config(source: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """Read a YAML file (or built-in config name), apply overrides, validate into an ExperimentConfig."""
    data = _read_yaml(source) if source is not None else {}
    for override in overrides:
        apply_override(data, override)
    import_plugins(data.get("plugins") or [])
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as error:
        lines = [f"  {'.'.join(str(x) for x in e['loc']) or '(top level)'}: {e['msg']}" for e in error.errors()]
        raise ConfigError(f"invalid config {source or '(defaults)'}:\n" + "\n".join(lines)) from None


def dump_config(config: ExperimentConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
