"""kill -9 while a model folder is saved again and again: afterwards the folder holds exactly the old or the new
model (card and weights of one save), and loads."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch
from _faults import kill_loop

from facesphere.models import store
from facesphere.models.card import ModelCard
from facesphere.models.runs import load_backbone, load_embedder

WRITER = textwrap.dedent("""
    import torch
    from facesphere.models import store
    from facesphere.models.card import ModelCard
    folder = {folder!r}
    if not {exchange!r}:
        store._exchange = lambda a, b: False  # the rename-to-backup fallback of systems without an atomic swap
    {versions}
    print("ready", flush=True)
    while True:
        for name in ("A", "B"):
            store.save_model(folder, *versions[name])
            print(name, flush=True)
""")

VERSIONS = """
def version(name, seed):
    card = ModelCard(name=name, backbone="mobilefacenet", backbone_args={"bn_eps": 1e-3}, input_size=(112, 96),
                     colour_order="RGB", mean=(127.5,) * 3, std=(128.0,) * 3, alignment="sphereface_112x96",
                     embedding_size=32, licence="test", source="test")
    torch.manual_seed(seed)
    backbone = card.build_backbone()
    with torch.no_grad():
        for value in backbone.state_dict().values():
            if value.is_floating_point():
                value.copy_(torch.randn_like(value))
    return backbone, card
versions = {"A": version("A", 1), "B": version("B", 2)}
"""


def _versions() -> dict:
    scope: dict = {"torch": torch, "ModelCard": ModelCard}
    exec(VERSIONS, scope)
    return scope["versions"]


@pytest.mark.slow  # ~20 writer processes, each importing torch
@pytest.mark.parametrize("exchange", [True, False], ids=["atomic-swap", "backup-fallback"])
def test_a_killed_model_folder_save_leaves_the_old_or_the_new_model(tmp_path, exchange):
    folder = tmp_path / "model"
    versions = _versions()
    store.save_model(folder, *versions["A"])
    (folder / "README.md").write_text("kept\n")
    expected = {name: {k: v.clone() for k, v in backbone.state_dict().items()} for name, (backbone, _) in versions.items()}
    seen: set[str] = set()

    def check(run: int) -> None:
        if not exchange:
            store._recover(folder)  # what the next save does first
        backbone, card, _ = load_backbone(folder)
        assert card.name in expected, card.name
        state = backbone.state_dict()
        assert all(torch.equal(state[k], v) for k, v in expected[card.name].items()), f"run {run}: mixed weights"
        assert load_embedder(folder).card.name == card.name
        assert sorted(p.name for p in folder.iterdir()) == ["README.md", "card.json", "model.safetensors"]
        seen.add(card.name)

    writer = WRITER.format(folder=str(folder), exchange=exchange, versions=VERSIONS)
    result = kill_loop(writer, check, runs=6 if exchange else 3, max_delay_s=1.5)
    print(f"kill loop: {result}")
    assert result.mid_write >= result.runs // 2 and result.writes >= result.runs, result
    assert seen == {"A", "B"}
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "model"]
    assert len(leftovers) <= 1, leftovers  # at most the temporary folder of the last killed save
    store.save_model(folder, *versions["B"])
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
