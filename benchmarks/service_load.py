"""Bounded load test of the REST API (``facesphere serve``) on loopback, against in-process identify.

A fresh server (SCRFD-500M + MobileFaceNet y1, ``--threads 2``, open-set threshold 0.3) runs as a child
process on a free loopback port. Phases, each with a fixed request count and a fixed number of clients
(one ``httpx.Client`` per client thread, keep-alive, per-request timeout):

- enrol: N identities through ``POST /v1/identities``, one after another (CACD-VS photo ``NNNN_0`` as
  ``person-NNNN``);
- serial identify: ``POST /v1/identify`` with the ``NNNN_1`` photos, one client (the latency baseline
  of the HTTP path);
- load identify: R requests of ``POST /v1/identify`` (``NNNN_1`` photos, cycling) from C concurrent clients;
- mixed (optional, ``--mixed-requests``): C clients, a fixed cycle of identify 50 %, verify 20 %, detect
  20 % and ``GET /v1/identities`` 10 %.

Latency is client-side wall time per request (upload, queueing, decode, detect, embed, search, JSON).
Any non-2xx answer or exception counts as an error (the first few are logged); the run exits non-zero
after writing its results when any request failed. Correctness: identify top-1 accuracy (top match of
the largest face is ``person-NNNN`` for query ``NNNN_1`` and ``known``). After the server stopped (so the
two never compete for the CPU), the same identify runs in this process without HTTP, in one worker
thread as the service runs it (``FaceAnalyzer`` + ``LiveGallery`` over the same N identities, decode
included), and the report states the HTTP overhead as ratios to it.

    python benchmarks/service_load.py [--identities 100] [--requests 400] [--concurrency 4] [--mixed-requests 0]
                                      [--baseline 50] [--threads 2] [--timeout 60] [--match-threshold 0.3]
"""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from _common import DATA, markdown_table, setup_logging, write_results

logger = logging.getLogger("service_load")

PHOTOS = "data/cacd_vs_fold1/CACD_VS"
SCRFD = "weights/scrfd_500m_kps_onnx/scrfd_500m_bnkps.onnx"
MODEL = "weights/mobilefacenet_insightface_y1"
MIXED_CYCLE = ["identify", "verify", "identify", "detect", "identify", "verify", "identify", "detect", "identify",
               "list"]
"""Request kinds of the mixed phase, by request number modulo 10: identify 50 %, verify 20 %, detect 20 %, list 10 %."""
MAX_LOGGED_ERRORS = 5


def person(number: int) -> str:
    return f"person-{number:04d}"


def load_photos(identities: int) -> tuple[list[bytes], list[bytes]]:
    """(enrolment photos NNNN_0, query photos NNNN_1) as encoded JPEG bytes, for NNNN < identities."""
    folder = DATA / PHOTOS
    if not folder.is_dir():
        raise SystemExit(f"{folder} not found (set FACESPHERE_DATA)")
    if not 1 <= identities <= 400:
        raise SystemExit("--identities must be between 1 and 400 (CACD-VS fold 1 has 400 pairs)")
    return ([(folder / f"{n:04d}_0.jpg").read_bytes() for n in range(identities)],
            [(folder / f"{n:04d}_1.jpg").read_bytes() for n in range(identities)])


class ErrorLog:
    """Thread-safe error counter that logs the first few errors of a phase."""

    def __init__(self, phase: str) -> None:
        self.phase, self.count, self.first = phase, 0, []
        self._lock = threading.Lock()

    def add(self, what: str) -> None:
        with self._lock:
            self.count += 1
            if len(self.first) < MAX_LOGGED_ERRORS:
                self.first.append(what)
                logger.warning("%s: error %d: %s", self.phase, self.count, what)


def top1_correct(body: dict, number: int) -> bool:
    """Is the top match of the largest face ``person-NNNN`` and above the open-set threshold?"""
    faces = body.get("faces") or []
    matches = faces[0].get("matches") if faces else None
    return bool(matches) and matches[0]["name"] == person(number) and bool(matches[0]["known"])


def send(client, kind: str, number: int, enrol_photos: list[bytes], query_photos: list[bytes]):
    """One request of ``kind`` about photo pair ``number``: (response, correct), correct being identify's top-1
    or verify's ``same``, None for the other kinds."""
    if kind == "identify":
        response = client.post("/v1/identify", files={"image": (f"{number:04d}_1.jpg", query_photos[number], "image/jpeg")})
        return response, (top1_correct(response.json(), number) if response.is_success else False)
    if kind == "verify":
        files = {"image1": (f"{number:04d}_0.jpg", enrol_photos[number], "image/jpeg"),
                 "image2": (f"{number:04d}_1.jpg", query_photos[number], "image/jpeg")}
        response = client.post("/v1/verify", files=files)
        return response, (response.json().get("same") is True if response.is_success else False)
    if kind == "detect":
        return client.post("/v1/detect", files={"image": (f"{number:04d}_1.jpg", query_photos[number], "image/jpeg")}), None
    if kind == "list":
        return client.get("/v1/identities"), None
    raise ValueError(kind)


def run_phase(name: str, url: str, key: str, kinds: list[str], concurrency: int, timeout: float,
              enrol_photos: list[bytes], query_photos: list[bytes]) -> dict:
    """Send ``len(kinds)`` requests (request i: ``kinds[i]`` about pair i mod N) from ``concurrency`` client threads."""
    import httpx

    total, identities = len(kinds), len(query_photos)
    latencies = np.full(total, np.nan)
    correct: list[bool | None] = [None] * total
    errors = ErrorLog(name)
    next_request, counter_lock = iter(range(total)), threading.Lock()

    def client_loop(client) -> None:
        while True:
            with counter_lock:
                i = next(next_request, None)
            if i is None:
                return
            number = i % identities
            started = time.perf_counter()
            try:
                response, ok = send(client, kinds[i], number, enrol_photos, query_photos)
                latencies[i] = time.perf_counter() - started
                if not response.is_success:
                    errors.add(f"request {i} ({kinds[i]} {number:04d}): HTTP {response.status_code} {response.text[:200]}")
                correct[i] = ok
            except Exception as error:  # noqa: BLE001 - any failure of a request is an error of the run
                latencies[i] = time.perf_counter() - started
                errors.add(f"request {i} ({kinds[i]} {number:04d}): {type(error).__name__}: {error}")
                if kinds[i] in ("identify", "verify"):
                    correct[i] = False

    load_average = os.getloadavg()[0]
    clients = [httpx.Client(base_url=url, headers={"X-API-Key": key}, timeout=timeout) for _ in range(concurrency)]
    threads = [threading.Thread(target=client_loop, args=(c,), name=f"{name}-{j}") for j, c in enumerate(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    for client in clients:
        client.close()
    result = {"phase": name, "requests": total, "concurrency": concurrency, **latency_stats(latencies, wall),
              "errors": errors.count, "first_errors": errors.first, "load_average_1m": load_average, "by_kind": {}}
    identify = [c for k, c in zip(kinds, correct) if k == "identify"]
    result["identify_requests"] = len(identify)
    result["top1_accuracy"] = float(np.mean([bool(c) for c in identify])) if identify else None
    for kind in sorted(set(kinds)):
        mask = np.array([k == kind for k in kinds])
        checked = [bool(c) for k, c in zip(kinds, correct) if k == kind and c is not None]
        result["by_kind"][kind] = {"requests": int(mask.sum()), "p50_ms": float(np.percentile(latencies[mask], 50) * 1e3),
                                   "correct_rate": float(np.mean(checked)) if checked else None}
    logger.info("%s: %d requests, %d clients, %.1f s, %.2f req/s, p50 %.0f ms, p99 %.0f ms, %d errors%s", name, total,
                concurrency, wall, result["requests_per_second"], result["p50_ms"], result["p99_ms"], errors.count,
                "" if result["top1_accuracy"] is None else f", top-1 {result['top1_accuracy']:.3f}")
    return result


def latency_stats(seconds: np.ndarray, wall: float) -> dict:
    p50, p90, p99 = np.percentile(seconds, [50, 90, 99]) * 1e3
    return {"wall_seconds": wall, "requests_per_second": len(seconds) / wall, "mean_ms": float(seconds.mean() * 1e3),
            "p50_ms": float(p50), "p90_ms": float(p90), "p99_ms": float(p99), "max_ms": float(seconds.max() * 1e3)}


def enrol_phase(url: str, key: str, timeout: float, enrol_photos: list[bytes]) -> dict:
    """Enrol ``person-NNNN`` from ``NNNN_0``, one request at a time; then check the listing holds every name."""
    import httpx

    latencies, errors = np.full(len(enrol_photos), np.nan), ErrorLog("enrol")
    load_average = os.getloadavg()[0]
    with httpx.Client(base_url=url, headers={"X-API-Key": key}, timeout=timeout) as client:
        started = time.perf_counter()
        for n, photo in enumerate(enrol_photos):
            begun = time.perf_counter()
            try:
                response = client.post("/v1/identities", data={"name": person(n)},
                                       files=[("images", (f"{n:04d}_0.jpg", photo, "image/jpeg"))])
                if not response.is_success:
                    errors.add(f"{person(n)}: HTTP {response.status_code} {response.text[:200]}")
            except Exception as error:  # noqa: BLE001
                errors.add(f"{person(n)}: {type(error).__name__}: {error}")
            latencies[n] = time.perf_counter() - begun
        wall = time.perf_counter() - started
        listed = {i["name"] for i in client.get("/v1/identities").raise_for_status().json()}
    missing = sorted({person(n) for n in range(len(enrol_photos))} - listed)
    if missing:
        logger.warning("enrol: %d identities not listed after enrolment, e.g. %s", len(missing), missing[:5])
    result = {"phase": "enrol", "requests": len(enrol_photos), "concurrency": 1, **latency_stats(latencies, wall),
              "errors": errors.count, "first_errors": errors.first, "identities_listed": len(listed),
              "load_average_1m": load_average, "top1_accuracy": None}
    logger.info("enrol: %d identities in %.1f s (p50 %.0f ms), %d errors, %d listed", len(enrol_photos), wall,
                result["p50_ms"], errors.count, len(listed))
    return result


def peak_rss_mib(pid: int) -> float | None:
    """VmHWM of a live process (Linux), MiB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def in_process_baseline(tmp: Path, model: Path, args, enrol_photos: list[bytes], query_photos: list[bytes]) -> dict:
    """The identify of the service without HTTP: decode + analyse + search, one thread, same N identities.

    Models built and run on one ``ModelThread``, as ``facesphere serve`` does (PyTorch's OpenMP team belongs to
    the thread that first runs a parallel op; mixing threads made MobileFaceNet 3x slower here)."""
    from facesphere.pipeline import AnalyzerSpec, build_analyzer
    from facesphere.data.images import load_image_bytes
    from facesphere.gallery import Gallery, LiveGallery
    from facesphere.service import ServiceSettings
    from facesphere.service.model_thread import ModelThread

    model_thread = ModelThread()
    analyzer = model_thread.run(build_analyzer, AnalyzerSpec(detector="scrfd", detector_weights=DATA / SCRFD, model=model,
                                                              threads=args.threads))
    analyzer.max_faces = ServiceSettings.model_fields["max_faces"].default  # as the service sets it
    top_k = ServiceSettings.model_fields["top_k"].default
    live = LiveGallery(Gallery(tmp / "base.sqlite", analyzer.embedder.card))

    def identify(number: int) -> bool:
        faces = analyzer.analyze([load_image_bytes(query_photos[number])])[0].faces
        if not faces:
            return False
        matches = live.search(np.stack([f.embedding for f in faces]), top_k, args.match_threshold)[0]
        return bool(matches) and matches[0].name == person(number) and matches[0].known

    def run() -> dict:
        for n, photo in enumerate(enrol_photos):
            faces = analyzer.analyze([load_image_bytes(photo)])[0].faces
            if faces:
                live.enrol(person(n), faces[0].embedding[None])
        for n in range(min(3, len(query_photos))):  # warm-up
            identify(n)
        calls = args.baseline
        latencies, correct, load_average = np.empty(calls), [], os.getloadavg()[0]
        started = time.perf_counter()
        for i in range(calls):
            begun = time.perf_counter()
            correct.append(identify(i % len(query_photos)))
            latencies[i] = time.perf_counter() - begun
        wall = time.perf_counter() - started
        return {"phase": "in-process identify", "requests": calls, "concurrency": 1, **latency_stats(latencies, wall),
                "errors": 0, "identities": len(live), "load_average_1m": load_average,
                "top1_accuracy": float(np.mean(correct))}

    try:
        result = model_thread.run(run)
    finally:
        live.close()
        model_thread.close()
    logger.info("in-process: %d identify calls, %.1f ms per call (p50 %.1f), top-1 %.3f", result["requests"],
                result["mean_ms"], result["p50_ms"], result["top1_accuracy"])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--identities", type=int, default=100, help="people enrolled through the API (<= 400)")
    parser.add_argument("--requests", type=int, default=400, help="identify requests of the load phase")
    parser.add_argument("--concurrency", type=int, default=4, help="concurrent clients of the load and mixed phases")
    parser.add_argument("--mixed-requests", type=int, default=0,
                        help="requests of the optional mixed phase (identify/verify/detect/list); 0 skips it")
    parser.add_argument("--baseline", type=int, default=50,
                        help="identify calls of the serial HTTP phase and of the in-process baseline")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads of the server and of the in-process baseline")
    parser.add_argument("--timeout", type=float, default=60.0, help="per-request timeout, seconds")
    parser.add_argument("--match-threshold", type=float, default=0.3, help="open-set cosine threshold of identify")
    args = parser.parse_args()
    if min(args.requests, args.concurrency, args.baseline) < 1 or args.mixed_requests < 0:
        parser.error("--requests, --concurrency and --baseline must be >= 1, --mixed-requests >= 0")
    setup_logging()
    logging.getLogger("httpx").setLevel(logging.WARNING)  # no line per request
    from facesphere.models import import_weights
    from facesphere.models.store import save_model
    from facesphere.service.model_thread import ModelThread
    from facesphere.service.process import ServerProcess
    from facesphere.utils.allocator import tune_malloc

    tune_malloc()
    if not (DATA / SCRFD).is_file():
        raise SystemExit(f"{DATA / SCRFD} not found (set FACESPHERE_DATA)")
    enrol_photos, query_photos = load_photos(args.identities)
    photo_kib = float(np.mean([len(p) for p in enrol_photos + query_photos]) / 1024)
    phases: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="service_load_") as tmp_name:
        tmp = Path(tmp_name)
        model = tmp / "model"
        # on a thread of its own that ends: a PyTorch parallel op on the main thread would slow the baseline's
        # model thread (see facesphere.service.model_thread)
        converter = ModelThread()
        converter.run(lambda: save_model(model, *import_weights(DATA / MODEL)))
        converter.close()
        key = secrets.token_hex(16)
        (tmp / "keys.txt").write_text(key + "\n")
        serve_args = ["--gallery", str(tmp / "gallery.sqlite"), "--model", str(model), "--detector", "scrfd",
                      "--detector-weights", str(DATA / SCRFD), "--api-keys", str(tmp / "keys.txt"),
                      "--match-threshold", str(args.match_threshold), "--threads", str(args.threads)]
        log = tmp / "server.log"
        server_rss = None
        try:
            with ServerProcess(serve_args, log=log) as server:
                logger.info("server up at %s (pid %d)", server.url, server.process.pid)
                phases.append(enrol_phase(server.url, key, args.timeout, enrol_photos))
                phases.append(run_phase("serial identify", server.url, key, ["identify"] * args.baseline, 1,
                                        args.timeout, enrol_photos, query_photos))
                phases.append(run_phase("load identify", server.url, key, ["identify"] * args.requests,
                                        args.concurrency, args.timeout, enrol_photos, query_photos))
                if args.mixed_requests:
                    kinds = [MIXED_CYCLE[i % len(MIXED_CYCLE)] for i in range(args.mixed_requests)]
                    phases.append(run_phase("mixed", server.url, key, kinds, args.concurrency, args.timeout,
                                            enrol_photos, query_photos))
                server_rss = peak_rss_mib(server.process.pid)
        finally:
            if any(p["errors"] for p in phases) and log.is_file():
                logger.warning("server log tail:\n%s", log.read_text()[-3000:])
        baseline = in_process_baseline(tmp, model, args, enrol_photos, query_photos)

    errors = sum(p["errors"] for p in phases)
    by_name = {p["phase"]: p for p in phases}
    serial, load = by_name["serial identify"], by_name["load identify"]
    latency_ratio = serial["p50_ms"] / baseline["p50_ms"]
    throughput_ratio = baseline["requests_per_second"] / load["requests_per_second"]
    rows = []
    for p in [*phases, baseline]:
        endpoint = {"enrol": "POST /v1/identities", "serial identify": "POST /v1/identify",
                    "load identify": "POST /v1/identify", "mixed": "identify/verify/detect/list",
                    "in-process identify": "no HTTP"}[p["phase"]]
        accuracy = "" if p["top1_accuracy"] is None else f"{p['top1_accuracy']:.3f}"
        rows.append([p["phase"], endpoint, p["requests"], p["concurrency"], f"{p['wall_seconds']:.1f}",
                     f"{p['requests_per_second']:.2f}", f"{p['p50_ms']:.0f}", f"{p['p90_ms']:.0f}",
                     f"{p['p99_ms']:.0f}", f"{p['max_ms']:.0f}", p["errors"], accuracy, f"{p['load_average_1m']:.1f}"])
    description = (
        f"`facesphere serve` (SCRFD-500M + MobileFaceNet y1, flip-sum, `--threads {args.threads}`, match threshold "
        f"{args.match_threshold}) in a child process on loopback, driven by httpx clients in this process (one "
        f"`httpx.Client` per client thread, keep-alive, {args.timeout:g} s timeout). {args.identities} identities are "
        f"enrolled through the API from CACD-VS photos `NNNN_0` (250x250 JPEG, {photo_kib:.1f} KiB on average), then "
        f"`NNNN_1` photos of the same people are identified: {args.baseline} requests from 1 client, then "
        f"{args.requests} from {args.concurrency} concurrent clients"
        + (f", then {args.mixed_requests} mixed requests (identify 50 %, verify 20 %, detect 20 %, list 10 %) from "
           f"{args.concurrency} clients, where verify (photos `NNNN_0` vs `NNNN_1`) answered same for "
           f"{by_name['mixed']['by_kind']['verify']['correct_rate']:.3f}"
           if args.mixed_requests and "verify" in by_name["mixed"]["by_kind"] else "")
        + ". Latency is client-side wall time per request; any non-2xx answer or exception is an error; top-1 is the "
        f"share of identify requests whose top match is the right person and known. The service runs the networks "
        f"one request at a time, so concurrent clients queue. Baseline in the same run, after the server stopped: the "
        f"same identify (decode, detect, embed, search) in-process on one model thread as the server runs it, {args.baseline} calls, "
        f"{baseline['p50_ms']:.1f} ms per call (median). HTTP overhead: serial HTTP p50 / in-process p50 = "
        f"{latency_ratio:.2f}x; in-process calls/s / loaded-server requests/s = {throughput_ratio:.2f}x. "
        + (f"Server peak RSS {server_rss:.0f} MiB; " if server_rss is not None else "")
        + f"\"load 1m\" is the machine's 1-minute load average as each phase began: above {os.cpu_count()} (the "
        "logical CPUs), other work competed for the CPU and the timings of that phase are inflated.")
    table = description + "\n\n" + markdown_table(
        ["phase", "endpoint", "requests", "clients", "wall s", "req/s", "p50 ms", "p90 ms", "p99 ms", "max ms",
         "errors", "top-1", "load 1m"], rows)
    logger.info("\n%s", table)
    write_results("service_load", {"args": vars(args), "photo_kib": photo_kib,
                                   "server_peak_rss_mib": server_rss, "phases": phases, "in_process": baseline,
                                   "http_latency_ratio_p50": latency_ratio,
                                   "throughput_ratio_in_process_over_http": throughput_ratio, "errors": errors}, table)
    if errors:
        raise SystemExit(f"{errors} requests failed (see the log above and benchmarks/results/service_load.json)")


if __name__ == "__main__":
    main()
