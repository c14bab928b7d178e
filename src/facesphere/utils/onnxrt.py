"""ONNX Runtime sessions with explicit providers and thread counts.

ONNX Runtime silently runs on the CPU when a requested execution provider is missing (no CUDA build,
no driver); :func:`make_session` logs a warning naming every requested provider it could not use,
so a benchmark or a deployment never measures the CPU while believing it measures the GPU.
``onnxruntime`` is imported on first use, not when this module is imported.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

logger = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
ALIASES = {"cpu": CPU, "cuda": "CUDAExecutionProvider", "gpu": "CUDAExecutionProvider",
           "tensorrt": "TensorrtExecutionProvider", "coreml": "CoreMLExecutionProvider",
           "directml": "DmlExecutionProvider", "openvino": "OpenVINOExecutionProvider"}
"""Short names accepted besides ONNX Runtime's own provider names."""


class OnnxModelError(ValueError):
    """An ONNX file that ONNX Runtime cannot load; the message names the file."""


def resolve_providers(requested: Sequence[str] | str | None, available: Sequence[str]) -> list[str]:
    """The providers to use, in the requested order, ending with the CPU provider.

    Requested providers that are not ``available`` are dropped with a warning. The CPU provider is
    appended when absent, since ONNX Runtime assigns it every operator the others do not support.
    """
    if requested is None:
        requested = [CPU]
    elif isinstance(requested, str):
        requested = [requested]
    chosen = []
    for name in requested:
        full = ALIASES.get(name.lower(), name)
        if full not in available:
            logger.warning("ONNX Runtime provider %s was requested but is not available (available: %s); not using it",
                           full, ", ".join(available))
        elif full not in chosen:
            chosen.append(full)
    if CPU not in chosen:
        chosen.append(CPU)
    return chosen


def make_session(path: str | os.PathLike, providers: Sequence[str] | str | None = None, threads: int | None = None,
                 allow_spinning: bool = False):
    """An ``onnxruntime.InferenceSession`` for ``path``.

    ``providers``: ONNX Runtime names (``"CUDAExecutionProvider"``) or short ones (``"cuda"``, ``"cpu"``),
    in order of preference; default CPU only. ``threads``: intra-op threads (default: ONNX Runtime's,
    one per physical core); inter-op parallelism is kept at one thread. ``allow_spinning``: let idle intra-op
    threads busy-wait after a run (ONNX Runtime's default; off here, see below).
    """
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX model {path} does not exist")
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    options = ort.SessionOptions()
    options.inter_op_num_threads = 1
    # Idle intra-op threads would spin for a while after each run, starving whatever runs next on the same
    # cores (PyTorch's threads in a detect -> embed pipeline ran 2.5x slower beside them).
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if allow_spinning else "0")
    if threads is not None:
        options.intra_op_num_threads = threads
    chosen = resolve_providers(providers, ort.get_available_providers())
    try:
        session = ort.InferenceSession(str(path), options, providers=chosen)
    except Exception as error:  # onnxruntime raises its own exception types (Fail, InvalidGraph, ...)
        raise OnnxModelError(f"{path}: ONNX Runtime cannot load it ({error})") from error
    logger.info("%s: ONNX Runtime providers %s, intra-op threads %s", path.name, session.get_providers(),
                threads or "default")
    return session
