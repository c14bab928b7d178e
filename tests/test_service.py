"""REST API on real photos and models: keys, limits, enrol → identify → delete, verify, OpenAPI, persistence."""

from __future__ import annotations

import io
import json
import struct
import zlib
from urllib.parse import quote, unquote

import numpy as np
import pytest
from conftest import require_data
from fastapi.testclient import TestClient
from PIL import Image

from facesphere.gallery import Gallery, LiveGallery
from facesphere.service import ServiceSettings, create_app

SCRFD = "weights/scrfd_500m_kps_onnx/scrfd_500m_bnkps.onnx"
CACD = "data/cacd_vs_fold1/CACD_VS"
GROUP = "data/insightface_fixtures/python-package/insightface/data/images/t1.jpg"
KEY = "test-key-0123456789abcdef"
LIMIT = 1_000_000
THRESHOLD = 0.3


def _photo(name: str) -> bytes:
    return (require_data(CACD) / name).read_bytes()


@pytest.fixture(scope="module")
def analyzer(tmp_path_factory):
    from facesphere.detect import build_detector
    from facesphere.models import import_weights
    from facesphere.models.store import save_model
    from facesphere.models.torch_embedder import TorchEmbedder
    from facesphere.pipeline import FaceAnalyzer

    folder = tmp_path_factory.mktemp("models") / "y1"
    save_model(folder, *import_weights(require_data("weights/mobilefacenet_insightface_y1")))
    return FaceAnalyzer(build_detector("scrfd", require_data(SCRFD)), TorchEmbedder.from_folder(folder))


@pytest.fixture
def service(analyzer, tmp_path):
    live = LiveGallery(Gallery(tmp_path / "gallery.sqlite", analyzer.embedder.card))
    settings = ServiceSettings(api_keys=[KEY], max_request_bytes=LIMIT, max_image_pixels=4_000_000,
                               match_threshold=THRESHOLD)
    with TestClient(create_app(analyzer, live, settings), headers={"X-API-Key": KEY}) as client:
        yield client, live, tmp_path / "gallery.sqlite"
    live.close()


def _upload(name: str, data: bytes, field: str = "image") -> dict:
    return {field: (name, data, "image/jpeg")}


def test_every_api_route_refuses_requests_without_a_valid_key(service):
    client, _, _ = service
    spec = client.get("/openapi.json").json()
    assert spec["components"]["securitySchemes"]["APIKeyHeader"] == {
        "type": "apiKey", "in": "header", "name": "X-API-Key",
        "description": "one of the keys the service was started with"}
    routes = [(path, method) for path, item in spec["paths"].items() for method in item if path.startswith("/v1/")]
    assert len(routes) == 10
    for path, method in routes:
        url = path.replace("{name}", "someone")
        for headers, message in (({"X-API-Key": ""}, "missing API key"), ({"X-API-Key": "wrong" * 8}, "invalid API key")):
            answer = client.request(method.upper(), url, headers=headers)
            assert answer.status_code == 401 and message in answer.json()["error"], (method, path)
    assert client.get("/health", headers={"X-API-Key": ""}).json() == {"status": "ok"}
    assert "Identify" in client.get("/", headers={"X-API-Key": ""}).text


def test_oversized_uploads_are_refused_with_a_clear_error(service):
    client, live, _ = service
    big = b"\xff" * (LIMIT + 1)
    answer = client.post("/v1/identify", files=_upload("big.jpg", big))
    assert answer.status_code == 413
    assert answer.json()["error"].startswith("request too large") and "1,000,000 bytes" in answer.json()["error"]

    def chunks():  # no Content-Length: counted while streaming
        head = b"--b\r\nContent-Disposition: form-data; name=\"image\"; filename=\"x.jpg\"\r\n\r\n"
        yield head
        for _ in range(20):
            yield b"\0" * 100_000

    streamed = client.post("/v1/identify", content=chunks(), headers={"Content-Type": "multipart/form-data; boundary=b"})
    assert streamed.status_code == 413 and "exceeds the limit of 1,000,000 bytes" in streamed.json()["error"]
    # a small file declaring 3000 x 3000 pixels (over the 4 MP limit) is refused before decoding
    raw = b"\x00" + b"\x00" * 3000 * 3
    idat = zlib.compress(raw * 1)
    chunk = lambda kind, data: struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))  # noqa: E731
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 3000, 3000, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    bomb = client.post("/v1/detect", files=_upload("bomb.png", png))
    assert bomb.status_code == 413 and "3000x3000 exceeds the limit of 4000000 pixels" in bomb.json()["error"]
    huge = png.replace(struct.pack(">II", 3000, 3000), struct.pack(">II", 30000, 30000))  # beyond Pillow's own guard
    huge = huge[:29] + struct.pack(">I", zlib.crc32(huge[12:29])) + huge[33:]
    refused = client.post("/v1/detect", files=_upload("huge.png", huge))
    assert refused.status_code == 413 and "huge.png: refused as a decompression bomb" in refused.json()["error"]
    garbage = client.post("/v1/detect", files=_upload("notes.jpg", b"not an image at all"))
    assert garbage.status_code == 400 and "notes.jpg: not a recognised image format" in garbage.json()["error"]
    not_found = client.get("/v1/nothing-here")
    assert not_found.status_code == 404 and not_found.json() == {"error": "Not Found"}
    assert len(live) == 0


def test_enrol_identify_update_delete_on_real_photos(service, analyzer):
    client, live, path = service
    alice = client.post("/v1/identities", data={"name": "alice", "metadata": '{"team": "a"}'},
                        files=_upload("0001_0.jpg", _photo("0001_0.jpg"), "images"))
    assert alice.status_code == 201 and alice.json() == {"name": "alice", "metadata": {"team": "a"}, "templates": 1}
    carol = client.post("/v1/identities", data={"name": "carol"}, files=_upload("0002_0.jpg", _photo("0002_0.jpg"), "images"))
    assert carol.status_code == 201

    # the same person at another age is identified as alice, above the threshold; the score is the pipeline's cosine
    found = client.post("/v1/identify", files=_upload("0001_1.jpg", _photo("0001_1.jpg"))).json()
    (face,) = found["faces"]
    assert face["matches"][0]["name"] == "alice" and face["matches"][0]["known"]
    images = [require_data(CACD) / n for n in ("0001_0.jpg", "0001_1.jpg", "0002_0.jpg", "0003_0.jpg")]
    direct = [r.faces[0] for r in analyzer.analyze(images)]
    assert face["matches"][0]["score"] == pytest.approx(analyzer.compare(direct[0], direct[1]).cosine, abs=1e-5)
    # 0003_0 is another pair's person, not enrolled: the best matches are reported, but not as known
    stranger = client.post("/v1/identify", files=_upload("0003_0.jpg", _photo("0003_0.jpg"))).json()["faces"][0]
    best = max(stranger["matches"], key=lambda m: m["score"])
    assert not best["known"] and best["score"] < THRESHOLD
    assert {m["name"]: m["score"] for m in stranger["matches"]}["carol"] == pytest.approx(
        analyzer.compare(direct[2], direct[3]).cosine, abs=1e-5)

    # a second photo adds a template; metadata is replaced by PATCH; list and get agree
    more = client.post("/v1/identities", data={"name": "alice"}, files=_upload("0001_1.jpg", _photo("0001_1.jpg"), "images"))
    assert more.json()["templates"] == 2
    assert client.patch("/v1/identities/alice", json={"metadata": {"team": "b"}}).json()["metadata"] == {"team": "b"}
    assert [i["name"] for i in client.get("/v1/identities").json()] == ["alice", "carol"]
    assert client.get("/v1/identities/alice").json()["templates"] == 2
    assert live.disagreements() == ([], [])

    assert client.delete("/v1/identities/carol").status_code == 204
    missing = client.get("/v1/identities/carol")
    assert missing.status_code == 404 and missing.json() == {"error": "no identity named 'carol'"}
    again = client.post("/v1/identify", files=_upload("0002_0.jpg", _photo("0002_0.jpg"))).json()["faces"][0]
    assert [m["name"] for m in again["matches"]] == ["alice"]
    with Gallery(path) as reopened:  # the store on disk holds exactly what the API acknowledged
        assert [(i.name, i.templates, i.metadata) for i in reopened.identities()] == [("alice", 2, {"team": "b"})]


def test_enrolment_errors_are_clear_and_store_nothing(service):
    client, live, _ = service
    blank = io.BytesIO()
    Image.fromarray(np.full((200, 200, 3), 128, np.uint8)).save(blank, "PNG")
    no_face = client.post("/v1/identities", data={"name": "nobody"}, files=_upload("blank.png", blank.getvalue(), "images"))
    assert no_face.status_code == 422 and no_face.json()["error"] == "blank.png: no face found"
    files = [("images", ("0001_0.jpg", _photo("0001_0.jpg"), "image/jpeg")),
             ("images", ("blank.png", blank.getvalue(), "image/png"))]
    half = client.post("/v1/identities", data={"name": "half"}, files=files)
    assert half.status_code == 422, "one bad photo refuses the whole enrolment"
    bad_json = client.post("/v1/identities", data={"name": "x", "metadata": "{oops"},
                           files=_upload("0001_0.jpg", _photo("0001_0.jpg"), "images"))
    assert bad_json.status_code == 422 and bad_json.json()["error"].startswith("metadata is not JSON")
    too_far = client.post("/v1/identities", data={"name": "x", "face": "3"},
                          files=_upload("0001_0.jpg", _photo("0001_0.jpg"), "images"))
    assert too_far.status_code == 422 and "face 3 asked for, 1 found" in too_far.json()["error"]
    no_name = client.post("/v1/identities", files=_upload("0001_0.jpg", _photo("0001_0.jpg"), "images"))
    assert no_name.status_code == 422 and "name" in no_name.json()["error"]
    assert len(live) == 0 and client.get("/v1/identities").json() == []


def test_detect_embed_verify_agree_with_the_library(service, analyzer):
    client, _, _ = service
    group = require_data(GROUP).read_bytes()
    detected = client.post("/v1/detect", files=_upload("t1.jpg", group)).json()
    direct = analyzer.analyze([require_data(GROUP)])[0]
    assert len(detected["faces"]) == len(direct.faces) == 6
    assert np.allclose([f["box"] for f in detected["faces"]], [f.box for f in direct.faces], atol=0.01)
    embedded = client.post("/v1/embed", files=_upload("t1.jpg", group)).json()
    vectors = np.array([f["embedding"] for f in embedded["faces"]])
    assert vectors.shape == (6, 128) and np.allclose(vectors, [f.embedding for f in direct.faces], atol=1e-6)
    verdict = client.post("/v1/verify", files={"image1": ("a.jpg", _photo("0001_0.jpg"), "image/jpeg"),
                                               "image2": ("b.jpg", _photo("0001_1.jpg"), "image/jpeg")}).json()
    pair = analyzer.analyze([require_data(CACD) / "0001_0.jpg", require_data(CACD) / "0001_1.jpg"])
    assert verdict["cosine"] == pytest.approx(analyzer.compare(pair[0].faces[0], pair[1].faces[0]).cosine, abs=1e-5)
    assert verdict["same"] is (verdict["cosine"] >= THRESHOLD) and verdict["threshold"] == THRESHOLD
    info = client.get("/v1/info").json()
    assert info["model"] == "mobilefacenet_insightface_y1" and info["limits"]["max_request_bytes"] == LIMIT


def test_settings_refuse_weak_or_missing_keys(tmp_path, monkeypatch):
    from facesphere.service import read_api_keys

    with pytest.raises(ValueError, match="shorter than 16 characters"):
        ServiceSettings(api_keys=["short"])
    monkeypatch.delenv("FACESPHERE_API_KEYS", raising=False)
    with pytest.raises(ValueError, match="no API keys"):
        read_api_keys(None)
    keys = tmp_path / "keys.txt"
    keys.write_text("# service keys\n\n  abcdefghijklmnop0  \nqrstuvwxyz0123456\n")
    assert read_api_keys(keys) == ["abcdefghijklmnop0", "qrstuvwxyz0123456"]
    monkeypatch.setenv("FACESPHERE_API_KEYS", "k1-aaaaaaaaaaaaaaaa, k2-bbbbbbbbbbbbbbbb")
    assert read_api_keys(None) == ["k1-aaaaaaaaaaaaaaaa", "k2-bbbbbbbbbbbbbbbb"]
    assert json.loads(ServiceSettings(api_keys=["x" * 16]).model_dump_json())["max_request_bytes"] == 10 * 2**20


def test_served_page_references_only_shipped_assets(service):
    client, _, _ = service
    html = client.get("/").text
    for asset in ("/static/page.js", "/static/page.css"):
        assert asset in html and client.get(asset).status_code == 200


def test_names_with_slashes_and_unicode_round_trip(service):
    client, _, _ = service
    name = "Zoë / team-A"
    made = client.post("/v1/identities", data={"name": name}, files=_upload("0001_0.jpg", _photo("0001_0.jpg"), "images"))
    assert made.status_code == 201 and made.json()["name"] == name
    assert client.get(f"/v1/identities/{quote(name)}").json()["name"] == name
    assert client.delete(f"/v1/identities/{quote(name)}").status_code == 204
    assert client.get("/v1/identities").json() == []


def test_a_gallery_of_another_model_is_refused(analyzer, tmp_path):
    from facesphere.gallery import GalleryError

    other = analyzer.embedder.card.model_copy(update={"name": "another_model"})
    live = LiveGallery(Gallery(tmp_path / "other.sqlite", other))
    settings = ServiceSettings(api_keys=[KEY])
    with pytest.raises(GalleryError, match="holds templates of model 'another_model'"):
        create_app(analyzer, live, settings)
    live.close()


def test_serve_refuses_to_start_without_keys(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from facesphere.cli.main import app

    monkeypatch.delenv("FACESPHERE_API_KEYS", raising=False)
    weights = tmp_path / "detector.onnx"
    weights.write_bytes(b"unused")
    answer = CliRunner().invoke(app, ["serve", "--gallery", str(tmp_path / "g.sqlite"), "--model", str(tmp_path),
                                      "--detector", "scrfd", "--detector-weights", str(weights)])
    assert answer.exit_code == 2 and "no API keys" in answer.output
    assert not (tmp_path / "g.sqlite").exists()


@pytest.mark.parametrize("verbose", [False, True])
def test_a_weak_key_is_refused_without_printing_any_key(tmp_path, monkeypatch, verbose):
    """One strong and one short key: serve refuses to start, and neither key appears in what it prints (the
    validation error must not echo its input), even with debug logging."""
    import logging

    from typer.testing import CliRunner

    from facesphere.cli.main import app

    strong, short = "Zq" * 12 + "strongkey", "tinykey9"
    keys = tmp_path / "keys.txt"
    keys.write_text(f"{strong}\n{short}\n")
    weights = tmp_path / "detector.onnx"
    weights.write_bytes(b"unused")
    if verbose:
        monkeypatch.setattr(logging.getLogger("facesphere"), "level", logging.DEBUG)
    answer = CliRunner().invoke(app, ["serve", "--gallery", str(tmp_path / "g.sqlite"), "--model", str(tmp_path),
                                      "--detector", "scrfd", "--detector-weights", str(weights),
                                      "--api-keys", str(keys)])
    assert answer.exit_code == 2 and "shorter than 16 characters" in " ".join(answer.output.split())
    assert strong not in answer.output and short not in answer.output and "key9" not in answer.output
    assert not (tmp_path / "g.sqlite").exists()


BAD_NAMES = ["", "   ", ".", "..", " .. ", "al\x00ice", "\x00", "\x01\x02\x7f", "a\tb", "a\nb", "a\u2028b", "x" * 201]
TRICKY_NAMES = ["Zoë Ångström", "李小龍", "a b  c", "100% sure", "#1 fan", "who? me", "O'Brien \"the\" 2nd",
                "<script>alert(1)</script>", "a/b", "a/", "../x", "x/..", "%2F%00", "+plus+", "back\\slash", "…"]


def test_unaddressable_names_are_refused_with_a_clear_422(service):
    client, live, _ = service
    for name in BAD_NAMES:
        answer = client.post("/v1/identities", data={"name": name},
                             files=_upload("0001_0.jpg", _photo("0001_0.jpg"), "images"))
        assert answer.status_code == 422, (name, answer.text)
        error = answer.json()["error"]
        assert "name" in error and "\n" not in error, (name, error)
    assert len(live) == 0 and client.get("/v1/identities").json() == []


def test_every_accepted_tricky_name_can_be_fetched_patched_and_deleted(service):
    client, live, _ = service
    photo = _upload("0001_0.jpg", _photo("0001_0.jpg"), "images")
    for name in TRICKY_NAMES:
        made = client.post("/v1/identities", data={"name": name}, files=photo)
        assert made.status_code == 201 and made.json()["name"] == name, (name, made.text)
    assert sorted(i["name"] for i in client.get("/v1/identities").json()) == sorted(TRICKY_NAMES)
    for name in TRICKY_NAMES:
        if unquote(name) != name:  # Starlette's TestClient decodes the path twice; the page test (real server) has it
            assert client.delete(f"/v1/identities/{quote(quote(name, safe=''), safe='')}").status_code == 204
            continue
        url = f"/v1/identities/{quote(name, safe='')}"  # what the page's encodeURIComponent sends
        got = client.get(url)
        assert got.status_code == 200 and got.json()["name"] == name, (name, got.text)
        assert client.patch(url, json={"metadata": {"n": name}}).json()["metadata"] == {"n": name}, name
        assert client.delete(url).status_code == 204, name
        assert client.get(url).status_code == 404, name
    assert client.get("/v1/identities").json() == [] and len(live) == 0


def test_docs_pages_work_offline(service):
    """/docs and /redoc reference no other host, and every asset they reference is served by the app."""
    import re

    client, _, _ = service
    for page in ("/docs", "/redoc"):
        html = client.get(page, headers={"X-API-Key": ""})
        assert html.status_code == 200, page
        urls = re.findall(r"""(?:src|href|url)\s*[=:]\s*['"]([^'"]+)['"]""", html.text)
        assert urls, page
        external = re.findall(r"https?://[^\s'\"<>)]+", html.text)
        assert not external, (page, external)
        for url in urls:
            assert url.startswith("/"), (page, url)
            assert client.get(url, headers={"X-API-Key": ""}).status_code == 200, (page, url)


def test_serve_refuses_a_damaged_gallery_in_one_line(tmp_path):
    """`facesphere serve --gallery DAMAGED` stops with one line naming the file, exit 2, the file unchanged."""
    import hashlib

    from test_gallery_hostile import DAMAGE, _damaged
    from typer.testing import CliRunner

    from facesphere.cli.main import app
    from facesphere.models import import_weights
    from facesphere.models.store import save_model

    save_model(tmp_path / "y1", *import_weights(require_data("weights/mobilefacenet_insightface_y1")))
    for kind in DAMAGE:
        path = _damaged(tmp_path, kind)
        before = hashlib.sha256(path.read_bytes()).hexdigest()
        done = CliRunner().invoke(app, ["serve", "--gallery", str(path), "--model", str(tmp_path / "y1"),
                                        "--detector", "scrfd", "--detector-weights", str(require_data(SCRFD))],
                                  env={"FACESPHERE_API_KEYS": KEY})
        assert done.exit_code == 2 and "Traceback" not in done.output, (kind, done.output, done.exception)
        assert path.name in " ".join(done.output.split()), (kind, done.output)
        assert hashlib.sha256(path.read_bytes()).hexdigest() == before, kind
