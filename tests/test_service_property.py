"""Property tests of the REST request models: random names, metadata JSON, face indices, top-k values, file counts
and bodies. Every answer is 2xx, or 4xx with a JSON ``{"error": ...}``; never 500, never an error logged; an
enrolment that succeeds holds exactly the name (stripped) and metadata sent."""

from __future__ import annotations

import io
import json
import logging
from urllib.parse import quote

import numpy as np
import pytest
from conftest import require_data
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from facesphere.gallery import Gallery, LiveGallery
from facesphere.service import ServiceSettings, create_app

SCRFD = "weights/scrfd_500m_kps_onnx/scrfd_500m_bnkps.onnx"
CACD = "data/cacd_vs_fold1/CACD_VS"
KEY = "property-key-0123456789abcdef"
MAX_FILES = 3

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12)
NAMES = st.text(max_size=30) | st.sampled_from([".", "..", " ", "\x00", "a/b", "%2F", "x" * 250])
TEXT_OR_INT = st.integers(-5, 10**12).map(str) | st.text(max_size=12)


class _Errors(logging.Handler):
    """Collects what the service logs at ERROR or with a traceback."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.ERROR or record.exc_info:
            self.records.append(record.getMessage())


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    from facesphere.detect import build_detector
    from facesphere.models import import_weights
    from facesphere.models.store import save_model
    from facesphere.models.torch_embedder import TorchEmbedder
    from facesphere.pipeline import FaceAnalyzer

    root = tmp_path_factory.mktemp("property")
    save_model(root / "y1", *import_weights(require_data("weights/mobilefacenet_insightface_y1")))
    analyzer = FaceAnalyzer(build_detector("scrfd", require_data(SCRFD)), TorchEmbedder.from_folder(root / "y1"))
    live = LiveGallery(Gallery(root / "gallery.sqlite", analyzer.embedder.card))
    settings = ServiceSettings(api_keys=[KEY], max_request_bytes=2_000_000, max_files=MAX_FILES, match_threshold=0.3)
    errors = _Errors()
    logging.getLogger().addHandler(errors)
    with TestClient(create_app(analyzer, live, settings), headers={"X-API-Key": KEY},
                    raise_server_exceptions=False) as client:
        yield client, errors
    logging.getLogger().removeHandler(errors)
    live.close()


@pytest.fixture(scope="module")
def photos():
    small = io.BytesIO()
    Image.fromarray(np.full((48, 48, 3), 200, np.uint8)).save(small, "PNG")  # no face: analysed fast
    return {"face": (require_data(CACD) / "0001_0.jpg").read_bytes(), "blank": small.getvalue(),
            "garbage": b"\x89PNG not really", "empty": b""}


def _answered(answer, errors: _Errors) -> None:
    assert answer.status_code < 500, answer.text
    if answer.status_code >= 400:
        body = answer.json()
        assert isinstance(body, dict) and isinstance(body.get("error"), str) and body["error"], body
    elif answer.status_code != 204:
        answer.json()
    assert not errors.records, errors.records


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])  # a face photo per example
@given(name=NAMES, metadata=JSON_VALUES.map(json.dumps) | st.text(max_size=30), face=TEXT_OR_INT,
       kinds=st.lists(st.sampled_from(["face", "blank", "garbage", "empty"]), max_size=MAX_FILES + 1))
@example(name="nan", metadata='{"a": NaN}', face="0", kinds=["face"])  # JSON cannot hold NaN: refused, not nulled
def test_property_enrol_form_never_fails_the_server(api, photos, name, metadata, face, kinds):
    client, errors = api
    files = [("images", (f"p{i}.jpg", photos[kind], "image/jpeg")) for i, kind in enumerate(kinds)]
    answer = client.post("/v1/identities", data={"name": name, "metadata": metadata, "face": face}, files=files)
    _answered(answer, errors)
    if answer.status_code == 201:
        made = answer.json()["name"]
        assert made == name.strip() and answer.json()["metadata"] == json.loads(metadata)
        assert client.delete(f"/v1/identities/{quote(made, safe='')}").status_code == 204


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(k=TEXT_OR_INT, kind=st.sampled_from(["blank", "garbage", "empty"]))
def test_property_identify_top_k_never_fails_the_server(api, photos, k, kind):
    client, errors = api
    answer = client.post("/v1/identify", params={"k": k}, files={"image": ("x.png", photos[kind], "image/png")})
    _answered(answer, errors)
    if answer.status_code == 200:
        assert 1 <= int(k) <= 100


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=NAMES, body=st.dictionaries(st.sampled_from(["metadata", "other"]), JSON_VALUES, max_size=2)
       | JSON_VALUES, method=st.sampled_from(["GET", "PATCH", "DELETE"]))
def test_property_identity_paths_and_metadata_never_fail_the_server(api, name, body, method):
    client, errors = api
    url = f"/v1/identities/{quote(name, safe='')}"
    answer = client.request(method, url, content=json.dumps(body), headers={"Content-Type": "application/json"})
    _answered(answer, errors)
    if answer.status_code < 300:  # nothing is enrolled: only a dot segment ('.', which clients drop) lists them all
        assert method == "GET" and answer.json() == [] and name.strip(" ") in ("", ".", ".."), (name, answer.text)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(first=st.binary(max_size=64), second=st.sampled_from(["blank", "garbage", "empty"]),
       path=st.sampled_from(["/v1/detect", "/v1/embed", "/v1/verify"]))
def test_property_photo_bodies_never_fail_the_server(api, photos, first, second, path):
    client, errors = api
    files = ({"image": ("a.jpg", first, "image/jpeg")} if path != "/v1/verify" else
             {"image1": ("a.jpg", first, "image/jpeg"), "image2": ("b.png", photos[second], "image/png")})
    _answered(client.post(path, files=files), errors)
