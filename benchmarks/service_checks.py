"""Durability and refusals of ``facesphere serve`` on loopback, measured on a real server process.

1. kill -9 during streams of enrolments (``--rounds`` rounds, ``--streams`` concurrent clients, the kill at a
   seeded random count of acknowledged enrolments), restart on the same gallery: acknowledged enrolments
   present, half-applied ones, in-flight ones that landed, and whether the rebuilt index agrees with the
   store (every stored identity's own photo finds it first with cosine > 0.999).
2. Refusals: every /v1 route without a key and with a wrong key (401), a body over the upload limit with
   and without Content-Length (413), an image declaring more pixels than allowed (413), a non-image (400).

    python benchmarks/service_checks.py [--rounds 5] [--streams 3]
"""

from __future__ import annotations

import argparse
import logging
import random
import struct
import tempfile
import threading
import zlib
from pathlib import Path

import httpx
from _common import DATA, markdown_table, setup_logging, write_results

from facesphere.service.process import ServerProcess

SCRFD = "weights/scrfd_500m_kps_onnx/scrfd_500m_bnkps.onnx"
CACD = "data/cacd_vs_fold1/CACD_VS"
KEY = "benchmark-key-0123456789abcdef"
logger = logging.getLogger("service_checks")


def _enrol_stream(url, photos, acknowledged, errors, stop) -> None:
    with httpx.Client(base_url=url, headers={"X-API-Key": KEY}, timeout=60) as client:
        for photo in photos:
            if stop.is_set():
                return
            try:
                answer = client.post("/v1/identities", data={"name": f"person-{photo.stem}"},
                                     files={"images": (photo.name, photo.read_bytes(), "image/jpeg")})
            except httpx.HTTPError:
                return
            if answer.status_code != 201:
                errors.append(f"{photo.name}: {answer.status_code} {answer.text[:200]}")
                return
            acknowledged.append(f"person-{photo.stem}")


def crash_round(args: list[str], log: Path, photos: list[Path], streams: int, kill_after: int) -> dict:
    acknowledged, errors, stop = [], [], threading.Event()
    server = ServerProcess(args, log=log).start()
    threads = [threading.Thread(target=_enrol_stream, args=(server.url, photos[i::streams], acknowledged, errors, stop))
               for i in range(streams)]
    for thread in threads:
        thread.start()
    while len(acknowledged) < kill_after and any(t.is_alive() for t in threads):
        threading.Event().wait(0.005)
    server.kill()
    stop.set()
    for thread in threads:
        thread.join()
    with ServerProcess(args, log=log) as restarted, \
            httpx.Client(base_url=restarted.url, headers={"X-API-Key": KEY}, timeout=60) as client:
        stored = {i["name"]: i["templates"] for i in client.get("/v1/identities").json()}
        disagreements = 0
        for name in stored:
            photo = photos[0].parent / f"{name.removeprefix('person-')}.jpg"
            top = client.post("/v1/identify", params={"k": 1},
                              files={"image": (photo.name, photo.read_bytes(), "image/jpeg")}).json()
            match = top["faces"][0]["matches"][0] if top.get("faces") else None
            disagreements += not (match and match["name"] == name and match["score"] > 0.999)
        indexed = client.get("/v1/info").json()["identities"]
    return {"kill_after": kill_after, "acknowledged": len(acknowledged), "errors": errors,
            "lost": len(set(acknowledged) - set(stored)), "stored": len(stored),
            "in_flight_landed": len(set(stored) - set(acknowledged)),
            "half_applied": sum(1 for t in stored.values() if t != 1), "indexed": indexed,
            "index_disagreements": disagreements}


def _png_declaring(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def refusals(args: list[str], log: Path, limit_bytes: int) -> list[dict]:
    out = []
    with ServerProcess(args, log=log) as server, httpx.Client(base_url=server.url, timeout=60) as client:
        routes = [(p.replace("{name}", "someone"), m.upper()) for p, item in client.get("/openapi.json").json()["paths"].items()
                  for m in item if p.startswith("/v1/")]
        for label, headers in (("no key", {}), ("wrong key", {"X-API-Key": "x" * 32})):
            codes = [client.request(method, path, headers=headers).status_code for path, method in routes]
            out.append({"case": f"{len(routes)} /v1 routes, {label}", "statuses": sorted(set(codes)),
                        "refused": sum(c == 401 for c in codes), "total": len(codes),
                        "message": client.get("/v1/info", headers=headers).json()["error"]})
        keyed = {"X-API-Key": KEY}
        big = b"\xff\xd8" + b"\0" * limit_bytes
        part = b'--b\r\nContent-Disposition: form-data; name="image"; filename="big.jpg"\r\n\r\n' + big
        cases = {
            f"{len(big):,}-byte upload with Content-Length": lambda: client.post(
                "/v1/identify", headers=keyed, files={"image": ("big.jpg", big, "image/jpeg")}),
            f"{len(big):,}-byte upload streamed (no Content-Length)": lambda: client.post(
                "/v1/identify", headers={**keyed, "Content-Type": "multipart/form-data; boundary=b"},
                content=(part[i:i + 65536] for i in range(0, len(part), 65536))),
            "PNG declaring 6000x6000 pixels (93 bytes)": lambda: client.post(
                "/v1/detect", headers=keyed, files={"image": ("big.png", _png_declaring(6000, 6000), "image/png")}),
            "PNG declaring 30000x30000 pixels (93 bytes)": lambda: client.post(
                "/v1/detect", headers=keyed, files={"image": ("bomb.png", _png_declaring(30000, 30000), "image/png")}),
            "text file sent as a photo": lambda: client.post(
                "/v1/detect", headers=keyed, files={"image": ("notes.jpg", b"hello", "image/jpeg")}),
        }
        for case, send in cases.items():
            answer = send()
            out.append({"case": case, "statuses": [answer.status_code], "refused": int(answer.status_code in (400, 413)),
                        "total": 1, "message": answer.json()["error"]})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--streams", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    options = parser.parse_args()
    setup_logging()
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request
    from facesphere.models import import_weights
    from facesphere.models.store import save_model
    from facesphere.utils.allocator import tune_malloc

    tune_malloc()
    photos = sorted((options.data / CACD).glob("*_0.jpg"))[:200]  # 200 different people
    rng = random.Random(options.seed)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        save_model(root / "y1", *import_weights(options.data / "weights/mobilefacenet_insightface_y1"))
        (root / "keys.txt").write_text(KEY + "\n")
        limit_mb = 10
        common = ["--model", str(root / "y1"), "--detector", "scrfd", "--detector-weights", str(options.data / SCRFD),
                  "--api-keys", str(root / "keys.txt"), "--threads", "1", "--max-upload-mb", str(limit_mb)]
        rounds = []
        for number in range(options.rounds):
            result = crash_round(["--gallery", str(root / f"crash{number}.sqlite"), *common], root / "server.log",
                                 photos, options.streams, rng.randint(10, 80))
            logger.info("round %d: %s", number, result)
            rounds.append(result)
        refused = refusals(["--gallery", str(root / "refusals.sqlite"), *common], root / "server.log", limit_mb * 2**20)
    crash_rows = [[i + 1, r["kill_after"], r["acknowledged"], r["lost"], r["half_applied"], r["in_flight_landed"],
                   r["stored"], r["indexed"], r["index_disagreements"], len(r["errors"])] for i, r in enumerate(rounds)]
    refusal_rows = [[r["case"], " ".join(map(str, r["statuses"])), f"{r['refused']}/{r['total']}", r["message"]]
                    for r in refused]
    table = (f"kill -9 of `facesphere serve` (y1 + SCRFD, 1 thread) while {options.streams} clients enrol different "
             f"CACD-VS people one photo at a time; restart on the same gallery.\n\n"
             + markdown_table(["round", "kill after", "acknowledged", "lost", "half-applied", "in-flight landed",
                               "stored", "in index", "index disagreements", "errors"], crash_rows)
             + f"\n\nRefusals (upload limit {limit_mb} MiB, image limit 25 MP):\n\n"
             + markdown_table(["request", "status", "refused", "error message"], refusal_rows))
    logger.info("\n%s", table)
    write_results("service_checks", {"rounds": rounds, "refusals": refused, "args": vars(options)}, table)
    failed = [r for r in rounds if r["lost"] or r["half_applied"] or r["index_disagreements"] or r["errors"]
              or r["indexed"] != r["stored"]] + [r for r in refused if r["refused"] != r["total"]]
    if failed:
        raise SystemExit(f"{len(failed)} checks failed: {failed}")


if __name__ == "__main__":
    main()
