"""Wall time and held-out accuracy of `facesphere quickstart`, run as a user would run it.

    python benchmarks/quickstart.py [--output-dir /tmp/facesphere-quickstart]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from _common import markdown_table, setup_logging, write_results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", type=Path, default=Path("/tmp/facesphere-quickstart"))
    args = parser.parse_args()
    setup_logging()
    shutil.rmtree(args.output_dir, ignore_errors=True)
    facesphere = Path(sys.executable).with_name("facesphere")
    started = time.perf_counter()
    out = subprocess.run([str(facesphere), "quickstart", "--output-dir", str(args.output_dir)], capture_output=True, text=True,
                         env={"COLUMNS": "200", "PATH": str(facesphere.parent)})
    wall = time.perf_counter() - started
    if out.returncode != 0:
        raise SystemExit(f"quickstart failed:\n{out.stderr[-3000:]}")
    log = out.stdout + out.stderr
    untrained = float(re.search(r"untrained network: held-out verification accuracy ([\d.]+)%", log).group(1))
    evaluation = json.loads((args.output_dir / "quickstart" / "evaluation.json").read_text())
    metrics = (args.output_dir / "quickstart" / "metrics.csv").read_text().strip().splitlines()
    trained = 100 * evaluation["accuracy_mean"]
    run_machine = json.loads((args.output_dir / "quickstart" / "machine.json").read_text())
    table = markdown_table(["wall time (s)", "untrained accuracy %", "trained accuracy %", "± std", "pairs", "unseen identities",
                            "TAR@FAR=1e-2"],
                           [[f"{wall:.0f}", f"{untrained:.2f}", f"{trained:.2f}", f"{100 * evaluation['accuracy_std']:.2f}",
                             evaluation["num_pairs"], evaluation["num_identities"], evaluation["tar_at_far"].get("0.01")]])
    table += f"\n\nAllocator inside the quickstart process: {json.dumps(run_machine['allocator'])}"
    print(table)
    write_results("quickstart", {"run_machine": run_machine, "wall_seconds": wall, "untrained_accuracy": untrained / 100, "evaluation": evaluation,
                                 "last_metrics_row": metrics[-1], "log_tail": log[-4000:]}, table)


if __name__ == "__main__":
    main()
