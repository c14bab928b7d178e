"""Named evaluation protocols, for ``facesphere eval <protocol> <data path>``.

Every protocol is a function ``(model, path, **options) -> dict`` registered under its name (each
pair-set format of ``evaluate.pairsets.PAIRSET_FORMATS`` is one, reading with its own options); ``model``
is an ``nn.Module`` or a function from a (B, 3, H, W) tensor to (B, D) embeddings. Common options
(``preprocess``, ``flip``, ``batch_size``, ``device``, ``amp_dtype``, ``out_dir``, ``progress``) are
passed through to the embedding / evaluation functions; each protocol's docstring lists its own.
With a model card, ``model_input.evaluate_with_card`` derives ``preprocess`` from the card and
refuses mismatching input before any embedding (``facesphere eval``, training-time protocol runs).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

from facesphere.evaluate.pairset_eval import evaluate_pairset
from facesphere.evaluate.pairsets import PAIRSET_FORMATS, pairset_format
from facesphere.registry import Registry

logger = logging.getLogger(__name__)

__all__ = ["PROTOCOLS", "describe_protocols", "get_protocol", "list_protocols", "run_protocol"]

PROTOCOLS: Registry[dict] = Registry("evaluation protocol")


def _pairset_protocol(name: str) -> Callable[..., dict]:
    """The protocol of pair-set format ``name``: read the set with the format's options, then ``evaluate_pairset``."""
    reader = pairset_format(name)

    def run(model, path: str | os.PathLike, **options) -> dict:
        reading = {key: options.pop(key) for key in reader.options & set(options)}
        return evaluate_pairset(model, reader(path, **reading), **options)

    run.__name__ = run.__qualname__ = name
    run.__doc__ = reader.summary
    return run


for _name in PAIRSET_FORMATS.names():  # every pair-set format is a protocol of the same name
    PROTOCOLS.register(_name)(_pairset_protocol(_name))


def _detector_alignment(options: dict) -> None:
    """``detector=NAME, detector_weights=PATH`` become an ``align`` callable: the largest detected face, on the
    template of ``size`` (so the protocol runs through the whole detect-align pipeline)."""
    name, weights = options.pop("detector", None), options.pop("detector_weights", None)
    if name is None and weights is None:
        return
    if name is None or weights is None:
        raise ValueError("give both detector= and detector_weights=")
    if "align" in options:
        raise ValueError("give either align= or detector=, not both")
    from facesphere.align.templates import template_for_size
    from facesphere.detect import build_detector
    from facesphere.pipeline.analyzer import FaceAnalyzer

    alignment = template_for_size(tuple(options.get("size", (112, 112)))).name
    options["align"] = FaceAnalyzer(build_detector(name, weights), alignment=alignment).align_largest


@PROTOCOLS.register("cacd_vs")
def cacd_vs(model, path: str | os.PathLike, **options) -> dict:
    """CACD-VS cross-age verification over the folds present; ``detector=``/``detector_weights=`` (or an ``align``
    callable) align the raw photos, ``size=``."""
    from facesphere.evaluate.age import evaluate_cacd_vs

    _detector_alignment(options)
    return evaluate_cacd_vs(model, path, **options)


@PROTOCOLS.register("fgnet_identification")
def fgnet_identification(model, path: str | os.PathLike, **options) -> dict:
    """FG-NET leave-one-image-out rank-1/5/10, aligned by the 68 landmarks (or ``detector=``); ``distractors=``."""
    from facesphere.evaluate.age import fgnet_identification as run

    _detector_alignment(options)
    options.pop("out_dir", None)  # identification writes no files
    return run(model, path, **options)


@PROTOCOLS.register("fgnet_verification")
def fgnet_verification(model, path: str | os.PathLike, **options) -> dict:
    """FG-NET cross-age pairs (``min_age_gap=10``, ``seed=0``), 10-fold accuracy, TAR@FAR, VAL@FAR."""
    from facesphere.evaluate.age import fgnet_verification as run

    _detector_alignment(options)
    return run(model, path, **options)


def get_protocol(name: str) -> Callable[..., dict]:
    """The protocol function registered as ``name`` (KeyError listing the known names otherwise)."""
    return PROTOCOLS.get(name)


def list_protocols() -> list[str]:
    return PROTOCOLS.names()


def describe_protocols() -> dict[str, str]:
    """``{name: first line of its docstring}``, for ``facesphere eval --list``."""
    return {name: (PROTOCOLS.get(name).__doc__ or "").strip().splitlines()[0] for name in PROTOCOLS.names()}


def run_protocol(name: str, model, path: str | os.PathLike, **options) -> dict:
    """Run protocol ``name`` on the data at ``path``; the result also records ``protocol`` and ``data``."""
    logger.info("evaluation protocol %s on %s", name, path)
    result = get_protocol(name)(model, path, **options)
    return {"protocol": name, "data": str(path), **result}
