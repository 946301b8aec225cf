"""Peak memory of `ingest` on one very large image (issue 10: bounded decode).

Builds a temp project whose source folder holds one 8000×8000 PNG, runs the ingest stage in a
fresh child process and reads that process's peak RSS (VmHWM) — beside the same run on a
1000×1000 PNG, so the fixed cost (Python, imports) is measured in the same run. Prints the
peaks, the raw RGB size of the big image and the ratios.

    python benchmarks/ingest_memory.py [--side 8000]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
CHILD = """
import json, sys
from pathlib import Path
from loraforge.pipeline.runner import run_stage
report = run_stage(Path(sys.argv[1]), "ingest")["report"]
status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
print(json.dumps({"peak_mb": int(status["VmHWM"].split()[0]) / 1024, "items": report["items"]}))
"""


def make_image(path: Path, side: int) -> None:
    """A photo-like test card: smooth gradients plus mild noise, written as PNG."""
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, side, dtype=np.float32)
    rows = []
    for start in range(0, side, 1000):  # in strips, so the generator itself stays small
        y = ramp[start : start + 1000, None]
        x = np.broadcast_to(ramp[None, :], (len(y), side))
        strip = np.stack([(x + y) / 2, np.broadcast_to(y, x.shape), 255 - x], -1)
        strip = strip + rng.normal(0, 6, strip.shape).astype(np.float32)
        rows.append(np.clip(strip, 0, 255).astype(np.uint8))
    Image.fromarray(np.concatenate(rows)).save(path, compress_level=1)


def project_with(root: Path, side: int) -> Path:
    root.mkdir(parents=True)
    for name in ("pipeline.yaml", "params.yaml"):
        shutil.copy(REPO / name, root / name)
    (root / "src").mkdir()
    make_image(root / "src" / f"card_{side}.png", side)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["ingest"]["source"] = "src"
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return root


def peak(project: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(project)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, default=8000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        small = peak(project_with(Path(tmp) / "small", 1000))
        big = peak(project_with(Path(tmp) / "big", args.side))
    raw = args.side * args.side * 3 / 2**20
    print(f"ingest, one {args.side}x{args.side} PNG ({raw:.0f} MB as raw RGB)")
    print(f"  peak RSS, 1000x1000 image : {small['peak_mb']:8.0f} MB  (fixed cost: interpreter + imports)")
    print(f"  peak RSS, {args.side}x{args.side} image : {big['peak_mb']:8.0f} MB")
    extra = big["peak_mb"] - small["peak_mb"]
    print(f"  extra for the big image   : {extra:8.0f} MB = {extra / raw:.2f} x raw RGB")
    print(f"  goal: peak under 800 MB   : {'met' if big['peak_mb'] < 800 else 'NOT met'}")


if __name__ == "__main__":
    main()
