"""``facesphere export MODEL_DIR OUT.onnx``: a stored model as one ONNX file, checked against PyTorch."""

from __future__ import annotations

import logging
from pathlib import Path

import typer

from facesphere.cli.errors import user_errors

logger = logging.getLogger("facesphere")

CHECK_TOLERANCE = 1e-4
"""Largest 1 - cos(PyTorch, ONNX Runtime) accepted by the check (float32 reorderings give about 1e-7)."""


ModelDir = typer.Argument(..., help="model folder (card.json + model.safetensors), as written by `facesphere import`")
Output = typer.Argument(..., help="ONNX file to write (one file, dynamic batch axis)")


def export_command(model_dir: Path = ModelDir, output: Path = Output,
                   opset: int | None = typer.Option(None, help="ONNX opset (default: the exporter's)"),
                   fold_bn: bool = typer.Option(True, "--fold-bn/--keep-bn", help="fold BatchNorm into the convs first"),
                   check: bool = typer.Option(True, "--check/--no-check",
                                              help="compare ONNX Runtime with PyTorch on 4 random crops"),
                   overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing OUTPUT"),
                   ) -> None:
    """Export a stored model to ONNX with its model card in the metadata; check it in ONNX Runtime."""
    import numpy as np

    from facesphere.models.embedding_parity import compare_embeddings
    from facesphere.models.export_onnx import export_onnx
    from facesphere.models.onnx_runtime import OnnxEmbedder
    from facesphere.models.torch_embedder import TorchEmbedder

    with user_errors():
        if output.exists() and not overwrite:
            raise FileExistsError(f"{output} exists; pass --overwrite to replace it")
        reference = TorchEmbedder.from_folder(model_dir)
        export_onnx(reference.backbone, reference.card, output, opset=opset, fold_bn=fold_bn)
        if check:
            h, w = reference.card.input_size
            crops = np.random.default_rng(0).integers(0, 256, (4, h, w, 3), dtype=np.uint8)
            onnx_embedder = OnnxEmbedder(output)
            parity = compare_embeddings(reference.embed(crops, normalize=False),
                                        onnx_embedder.embed(crops, normalize=False))
            logger.info("ONNX Runtime vs PyTorch: %s", parity.describe())
            if parity.max_cosine_difference > CHECK_TOLERANCE:
                raise ValueError(f"{output}: ONNX Runtime disagrees with PyTorch (max 1 - cos "
                                 f"{parity.max_cosine_difference:.2e} > {CHECK_TOLERANCE:g}); the file is kept for "
                                 f"inspection")
    logger.info("wrote %s (%s)", output, reference.card.input_spec.describe())
