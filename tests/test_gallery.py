"""Gallery store (SQLite WAL, bound to a model card) and faiss search: round trips, refusals, recall, kill -9."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from facesphere.gallery import Gallery, GalleryError, SearchIndex
from facesphere.models.card import ModelCard


def _card(name: str = "y1", dim: int = 16) -> ModelCard:
    return ModelCard(name=name, backbone="mobilefacenet", input_size=(112, 112), colour_order="RGB",
                     mean=(127.5,) * 3, std=(128.0,) * 3, alignment="arcface_112x112", embedding_size=dim,
                     licence="test", source="test")


def _unit(rng, n: int, dim: int = 16) -> np.ndarray:
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_enrol_update_remove_and_reopen(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "g.sqlite"
    with Gallery(path, _card()) as g:
        g.enrol("alice", _unit(rng, 2), {"team": "a"}, sources=["a1.jpg", "a2.jpg"])
        g.enrol("bob", _unit(rng, 1))
        g.enrol("alice", _unit(rng, 1), {"badge": 7})
        assert [(i.name, i.templates) for i in g.identities()] == [("alice", 3), ("bob", 1)]
        assert g.get("alice").metadata == {"team": "a", "badge": 7}
        g.update("bob", {"team": "b"})
        g.remove("alice")
        with pytest.raises(GalleryError, match="no identity named 'alice'"):
            g.remove("alice")
    with Gallery(path) as g:  # reopened without a card: the stored one is used
        assert [(i.name, i.metadata) for i in g.identities()] == [("bob", {"team": "b"})]
        assert g.card.name == "y1" and len(g) == 1


def test_templates_of_another_model_never_mix(tmp_path):
    path = tmp_path / "g.sqlite"
    Gallery(path, _card()).close()
    with pytest.raises(GalleryError, match="cannot be mixed"):
        Gallery(path, _card(name="xiaoccer"))
    with Gallery(path) as g:
        with pytest.raises(GalleryError, match=r"expected \(N, 16\) embeddings"):
            g.enrol("carol", np.ones(128))
        with pytest.raises(GalleryError, match="finite and non-zero"):
            g.enrol("carol", np.zeros(16))
    with pytest.raises(GalleryError, match="give the model card"):
        Gallery(tmp_path / "missing.sqlite")


def test_identity_template_is_the_normalised_mean_and_search_is_open_set(tmp_path):
    rng = np.random.default_rng(1)
    with Gallery(tmp_path / "g.sqlite", _card()) as g:
        views = _unit(rng, 3)
        g.enrol("alice", views)
        g.enrol("bob", _unit(rng, 2))
        names, matrix = g.identity_templates()
        mean = views.sum(0) / np.linalg.norm(views.sum(0))
        assert names == ["alice", "bob"] and np.allclose(matrix[0], mean, atol=1e-6)
        index = SearchIndex.from_gallery(g)
    top = index.search(mean, k=2)[0]
    assert top[0].name == "alice" and top[0].score == pytest.approx(1.0, abs=1e-5) and top[1].name == "bob"
    stranger = index.search(-mean, k=1, threshold=0.5)[0]
    assert not stranger[0].known and stranger[0].score < 0.5 and top[0].known


@pytest.mark.parametrize("kind,storage,floor", [("flat", "fp32", 1.0), ("flat", "fp16", 0.99), ("flat", "int8", 0.97),
                                                ("hnsw", "fp32", 0.95), ("hnsw", "int8", 0.9), ("ivfpq", "fp32", 0.6)])
def test_approximate_indexes_against_exact_search(kind, storage, floor):
    rng = np.random.default_rng(2)
    gallery = _unit(rng, 10_000, 64)  # IVF-PQ trains 8-bit sub-quantisers (256 codes): ~10k points suffice
    queries = gallery[:500] + 0.35 * _unit(rng, 500, 64)
    exact = (queries @ gallery.T).argmax(axis=1)
    index = SearchIndex([str(i) for i in range(len(gallery))], gallery, kind=kind, storage=storage)
    found = np.array([int(m[0].name) for m in index.search(queries, k=1)])
    assert (found == exact).mean() >= floor


WRITER = textwrap.dedent("""
    import sys
    import numpy as np
    from facesphere.gallery import Gallery
    from facesphere.models.card import ModelCard
    card = ModelCard(name="y1", backbone="mobilefacenet", input_size=(112, 112), colour_order="RGB",
                     mean=(127.5,) * 3, std=(128.0,) * 3, alignment="arcface_112x112", embedding_size=16,
                     licence="test", source="test")
    g = Gallery(sys.argv[1], card)
    rng = np.random.default_rng(0)
    for i in range(100000):
        g.enrol(f"person{i:06d}", rng.standard_normal((2, 16)))
        print(f"person{i:06d}", flush=True)  # acknowledged only after the commit returned
""")


def test_kill_9_during_enrolment_loses_no_acknowledged_identity(tmp_path):
    path = tmp_path / "g.sqlite"
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True, env=env)
    acknowledged = []
    for line in proc.stdout:
        acknowledged.append(line.strip())
        if len(acknowledged) >= 60:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait()
    acknowledged += [line.strip() for line in proc.stdout]
    with Gallery(path) as g:
        stored = {i.name for i in g.identities()}
        assert set(acknowledged) <= stored
        assert all(i.templates == 2 for i in g.identities()), "a transaction was half applied"
        names, _ = g.identity_templates()
        assert len(SearchIndex.from_gallery(g)) == len(names) == len(stored)


@pytest.mark.parametrize("kind,storage", [("flat", "fp32"), ("flat", "fp16"), ("hnsw", "fp32"), ("ivfpq", "fp32")])
def test_put_and_discard_match_a_rebuild(kind, storage):
    rng = np.random.default_rng(3)
    templates = _unit(rng, 3000, 32)
    names = [f"p{i}" for i in range(len(templates))]
    index = SearchIndex(names, templates, kind=kind, storage=storage)
    live = dict(zip(names, templates))
    for i in range(0, 3000, 7):  # replace every 7th template, remove every 11th identity, add 50 new ones
        live[names[i]] = _unit(rng, 1, 32)[0]
        index.put(names[i], live[names[i]])
    for i in range(0, 3000, 11):
        del live[names[i]]
        index.discard(names[i])
    for i in range(50):
        live[f"new{i}"] = _unit(rng, 1, 32)[0]
        index.put(f"new{i}", live[f"new{i}"])
    assert sorted(index.names) == sorted(live) and len(index) == len(live)
    assert index.dead_fraction == pytest.approx((429 + 273) / (3000 + 429 + 50))  # each replaced or removed row is dead
    rebuilt = SearchIndex(list(live), np.stack(list(live.values())), kind="flat")
    probes = list(live)[::13]
    got = [m[0].name for m in index.search(np.stack([live[n] for n in probes]), k=1)]
    want = [m[0].name for m in rebuilt.search(np.stack([live[n] for n in probes]), k=1)]
    assert want == probes
    assert np.mean([a == b for a, b in zip(got, want)]) >= (1.0 if kind == "flat" else 0.9)
    removed = [names[i] for i in range(0, 3000, 11)]
    hits = {m.name for row in index.search(templates[::11], k=5) for m in row}
    assert not hits & set(removed), "a removed identity was returned"


def test_live_gallery_follows_its_writes_and_reports_writes_it_missed(tmp_path):
    from facesphere.gallery import LiveGallery

    rng = np.random.default_rng(4)
    live = LiveGallery(Gallery(tmp_path / "g.sqlite", _card()), rebuild_at=0.5)
    views = {name: _unit(rng, 2) for name in ("ann", "bob", "cy")}
    for name, vectors in views.items():
        live.enrol(name, vectors)
    live.enrol("ann", _unit(rng, 1))  # a third photo moves ann's template
    live.remove("bob")
    assert live.disagreements() == ([], []) and len(live) == 2
    ann = live.gallery.template("ann")
    assert live.search(ann, k=1)[0][0].name == "ann" and live.search(ann, k=1)[0][0].score == pytest.approx(1, abs=1e-5)
    with Gallery(tmp_path / "g.sqlite") as other_process:  # a write the live index did not see
        other_process.enrol("dee", _unit(rng, 1))
    missing, _ = live.disagreements()
    assert missing == ["dee: in the store, not in the index"]
    live.rebuild()
    assert live.disagreements() == ([], []) and len(live) == 3
    live.close()
