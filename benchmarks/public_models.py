"""Public weights imported without MXNet, evaluated with facesphere's protocols, through the CLI.

InsightFace MobileFaceNet (y1, MXNet) and the Xiaoccer CASIA MobileFaceNet (PyTorch, 112x96) are
converted with `facesphere import`, then evaluated on the 13,233 aligned LFW images with the official
pairs.txt (10-fold), with BGR deliberately fed (the model card must refuse it), and on FG-NET.
Research files come from FACESPHERE_DATA (default ../shared); converted models go to a temp folder.

    python benchmarks/public_models.py [--work /tmp/facesphere-public] [--skip-fgnet]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from _common import DATA, markdown_table, setup_logging, write_results

LFW = DATA / "data/lfw_112x112/lfw-112X112"
PAIRS = DATA / "data/lfw_meta/facenet/data/pairs.txt"
PUBLISHED = {"insightface_y1": "LFW 99.50 (its training log, InsightFace's own crops); independent check on these crops "
                               "99.20-99.22", "xiaoccer": "LFW 99.30 claimed by its repository on SphereFace-aligned 112x96 crops (mirror-concat, "
                         "fold-mean subtraction); paper MobileFaceNet 112x96: 99.18"}


def facesphere(*args: str) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("facesphere")
    return subprocess.run([str(exe), *args], capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})


def evaluate(model: Path, protocol: str, data: Path, out: Path, *extra: str) -> dict:
    started = time.perf_counter()
    run = facesphere("eval", str(model), protocol, str(data), "--out", str(out), *extra)
    if run.returncode != 0:
        raise SystemExit(f"eval {model.name} {protocol} failed:\n{run.stderr[-3000:]}")
    results = json.loads((out / "results.json").read_text())
    results["process_seconds"] = time.perf_counter() - started
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/facesphere-public"))
    parser.add_argument("--skip-fgnet", action="store_true")
    args = parser.parse_args()
    setup_logging()
    models = {"insightface_y1": DATA / "weights/mobilefacenet_insightface_y1/model-symbol.json",
              "xiaoccer": DATA / "weights/mobilefacenet_casia_xiaoccer/068.ckpt"}
    for name, source in models.items():
        run = facesphere("import", str(source), str(args.work / name), "--overwrite")
        if run.returncode != 0:
            raise SystemExit(f"import {name} failed:\n{run.stderr[-3000:]}")
    lfw_opts = ["--set", f"pairs={PAIRS}"]
    out: dict[str, dict] = {}
    out["insightface_y1"] = evaluate(args.work / "insightface_y1", "lfw", LFW, args.work / "eval_y1_lfw", *lfw_opts)
    out["xiaoccer"] = evaluate(args.work / "xiaoccer", "lfw", LFW, args.work / "eval_xiaoccer_lfw", *lfw_opts,
                               "--set", "center_crop=112x96", "--set", "alignment=arcface_112x112")
    bgr = facesphere("eval", str(args.work / "insightface_y1"), "lfw", str(LFW), "--out", str(args.work / "eval_bgr"),
                     *lfw_opts, "--input-colour", "BGR")
    bgr_message = [line for line in (bgr.stderr + bgr.stdout).splitlines() if "expects" in line]
    out["bgr_fed"] = {"exit_code": bgr.returncode, "message": " ".join(bgr_message).strip(),
                      "results_written": (args.work / "eval_bgr" / "results.json").exists()}
    if not args.skip_fgnet:
        fgnet = DATA / "data/fgnet"
        out["fgnet_identification"] = evaluate(args.work / "insightface_y1", "fgnet_identification", fgnet,
                                               args.work / "eval_fgnet_id")
        out["fgnet_verification"] = evaluate(args.work / "insightface_y1", "fgnet_verification", fgnet,
                                             args.work / "eval_fgnet_ver")

    rows = []
    for name in ("insightface_y1", "xiaoccer"):
        r = out[name]
        h, t = r["headline"], r["throughput"]
        rows.append([name, "LFW 6,000 pairs", f"{100 * h['accuracy_mean']:.2f} ± {100 * h['accuracy_std']:.2f}",
                     f"{100 * h['val_mean']:.2f}" if h.get("val_mean") is not None else "n/a", t["images"],
                     f"{t['images_per_second']:.1f}", f"{r['wall_seconds']:.0f}", PUBLISHED[name]])
    for key, label in (("fgnet_identification", "FG-NET leave-one-out rank-1"), ("fgnet_verification", "FG-NET cross-age pairs")):
        if key in out:
            r = out[key]
            h, t = r["headline"], r["throughput"]
            value = h.get("rank_1", h.get("accuracy_mean"))
            std = f" ± {100 * h['accuracy_std']:.2f}" if "accuracy_std" in h and "rank_1" not in h else ""
            rows.append(["insightface_y1", label, f"{100 * value:.2f}{std}", "", t["images"], f"{t['images_per_second']:.1f}",
                         f"{r['wall_seconds']:.0f}", ""])
    table = markdown_table(["model", "protocol", "accuracy % (10-fold) / rank-1 %", "VAL@FAR=1e-3 %", "images",
                            "images/s (flip-sum, incl. decoding)", "wall s", "published"], rows)
    b = out["bgr_fed"]
    table += (f"\n\nBGR deliberately fed to insightface_y1: exit code {b['exit_code']}, results written: "
              f"{b['results_written']}, message: `{b['message']}`")
    print(table)
    write_results("public_models", {"runs": out}, table)


if __name__ == "__main__":
    main()
