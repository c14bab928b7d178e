"""kill -9 of a real ``facesphere serve`` during a stream of enrolments: after a restart every acknowledged
enrolment is in the store, complete, and the search index agrees with it (each finds itself)."""

from __future__ import annotations

import threading

import httpx
import pytest
from conftest import require_data

SCRFD = "weights/scrfd_500m_kps_onnx/scrfd_500m_bnkps.onnx"
CACD = "data/cacd_vs_fold1/CACD_VS"
KEY = "crash-test-key-0123456789"


@pytest.fixture(scope="module")
def serve_args(tmp_path_factory):
    from facesphere.models import import_weights
    from facesphere.models.store import save_model

    root = tmp_path_factory.mktemp("crash")
    save_model(root / "y1", *import_weights(require_data("weights/mobilefacenet_insightface_y1")))
    (root / "keys.txt").write_text(KEY + "\n")
    return root, ["--gallery", str(root / "gallery.sqlite"), "--model", str(root / "y1"), "--detector", "scrfd",
                  "--detector-weights", str(require_data(SCRFD)), "--api-keys", str(root / "keys.txt"),
                  "--threads", "1"]


def _enrol_stream(url: str, photos, acknowledged: list[str], errors: list[str], stop: threading.Event) -> None:
    with httpx.Client(base_url=url, headers={"X-API-Key": KEY}, timeout=30) as client:
        for photo in photos:
            if stop.is_set():
                return
            name = f"person-{photo.stem}"
            try:
                answer = client.post("/v1/identities", data={"name": name},
                                     files={"images": (photo.name, photo.read_bytes(), "image/jpeg")})
            except httpx.HTTPError:
                return  # the server died mid-request: not acknowledged
            if answer.status_code != 201:
                errors.append(f"{name}: {answer.status_code} {answer.text}")
                return
            acknowledged.append(name)


def test_kill_9_during_enrolments_loses_nothing_acknowledged(serve_args):
    from facesphere.service.process import ServerProcess

    root, args = serve_args
    photos = sorted(require_data(CACD).glob("*_0.jpg"))[:200]
    acknowledged: list[str] = []
    errors: list[str] = []
    stop = threading.Event()
    server = ServerProcess(args, log=root / "server.log").start()
    streams = [threading.Thread(target=_enrol_stream, args=(server.url, photos[i::2], acknowledged, errors, stop))
               for i in range(2)]
    for stream in streams:
        stream.start()
    while len(acknowledged) < 30 and any(s.is_alive() for s in streams):
        threading.Event().wait(0.01)
    server.kill()  # SIGKILL while both clients have an enrolment in flight
    stop.set()
    for stream in streams:
        stream.join()
    assert not errors
    assert 30 <= len(acknowledged) < len(photos), "the kill came too late to interrupt the stream"

    with ServerProcess(args, log=root / "server.log") as restarted, \
            httpx.Client(base_url=restarted.url, headers={"X-API-Key": KEY}, timeout=30) as client:
        stored = {i["name"]: i["templates"] for i in client.get("/v1/identities").json()}
        assert set(acknowledged) <= set(stored), f"lost: {sorted(set(acknowledged) - set(stored))}"
        assert set(stored.values()) == {1}, "an enrolment was half applied"
        assert len(stored) - len(acknowledged) <= 2, "more than the two in-flight enrolments appeared"
        assert client.get("/v1/info").json()["identities"] == len(stored)
        for name in stored:  # the index agrees with the store: every enrolled photo finds its own identity first
            photo = require_data(CACD) / f"{name.removeprefix('person-')}.jpg"
            top = client.post("/v1/identify", files={"image": (photo.name, photo.read_bytes(), "image/jpeg")},
                              params={"k": 1}).json()["faces"][0]["matches"][0]
            assert top["name"] == name and top["score"] > 0.999, (name, top)
