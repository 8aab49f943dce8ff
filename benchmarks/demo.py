"""Time the demo as a new user runs it (`spt run configs/demo.yaml`), and write what it gave.

    python benchmarks/demo.py          # -> benchmarks/results/demo/demo.md and demo.json

The README's demo timings and numbers are read from ``demo.json`` (a test checks that they
agree), so they are never typed by hand.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "benchmarks" / "results" / "demo"


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or platform.machine()) if Path("/proc/cpuinfo").exists() else platform.machine()
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, Python {platform.python_version()}"


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "demo"
        started = time.time()
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
        subprocess.run([sys.executable, "-m", "search", "run", str(REPO / "configs" / "demo.yaml"), "--out", str(run), "--quiet"],
                       check=True, env=env)
        wall = time.time() - started
        metrics = json.loads((run / "metrics.json").read_text())
        mask = json.loads((run / "layer_mask.json").read_text())
    result = {
        "date": time.strftime("%Y-%m-%d"), "machine": machine(), "command": "spt run configs/demo.yaml",
        "wall_minutes": round(wall / 60, 1), "search_seconds": round(metrics["search_seconds"]),
        "retrain_seconds": round(metrics["retrain_seconds"]), "selected_layers": mask["selected_layers"],
        "dev_accuracy": round(100 * metrics["dev"]["accuracy"], 1), "test_accuracy": round(100 * metrics["test"]["accuracy"], 1),
        "dev_examples": metrics["dev"]["n"], "test_examples": metrics["test"]["n"], "trainable_params": metrics["trainable_params"],
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "demo.json").write_text(json.dumps(result, indent=2) + "\n")
    (OUT / "demo.md").write_text(
        f"# The demo, timed\n\n`{result['command']}` on {result['machine']}, {result['date']}: {result['wall_minutes']} min in all "
        f"(search {result['search_seconds']} s, retraining {result['retrain_seconds']} s, the rest loading and evaluation); "
        f"selected layers {result['selected_layers']}, {result['trainable_params']:,} trainable parameters; "
        f"dev accuracy {result['dev_accuracy']} ({result['dev_examples']} sentences), test accuracy {result['test_accuracy']} "
        f"({result['test_examples']} sentences).\n")
    print((OUT / "demo.md").read_text())


if __name__ == "__main__":
    main()
