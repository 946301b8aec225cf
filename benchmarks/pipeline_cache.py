"""How much work the caches save: `dvc repro` cold, again with nothing changed, after one new
image, and after a trigger change — side by side in one run, on the demo data and tiny model.

    python benchmarks/pipeline_cache.py

Prints wall seconds per scenario and each as a ratio of the cold run. Run from the repo root
with the venv active (`dvc` and `loraforge` on PATH).
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.helpers import make_project, ran_stages, run, set_params  # noqa: E402


def timed_repro(project: Path) -> tuple[float, list[str]]:
    start = time.perf_counter()
    result = run(["dvc", "repro"], project)
    return time.perf_counter() - start, ran_stages(result.stdout)


def add_image(project: Path) -> None:
    """A picture unlike the demo's (a flipped copy of a symmetric shape is a duplicate, which
    ingest drops, so nothing downstream would change)."""
    import numpy as np
    from PIL import Image

    coarse = np.random.default_rng(7).integers(0, 256, (5, 5, 3), dtype=np.uint8)
    Image.fromarray(coarse).resize((160, 160), Image.Resampling.BICUBIC).save(
        project / "data" / "demo" / "soft colour blocks.png"
    )


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        project = make_project(Path(tmp) / "bench", params={})
        rows = []
        for name, change in [
            ("cold", None),
            ("no change", None),
            ("one new image", add_image),
            ("trigger changed", lambda p: set_params(p, {"caption": {"trigger": "benchstyle"}})),
        ]:
            if change:
                change(project)
            seconds, stages = timed_repro(project)
            latents = json.loads((project / "reports" / "latents.json").read_text())
            rows.append((name, seconds, len(stages), latents["computed"] if "latents" in stages else 0))
        cold = rows[0][1]
        print(f"{'scenario':<16} {'seconds':>8} {'vs cold':>8} {'stages run':>10} {'latents encoded':>16}")
        for name, seconds, stages, encoded in rows:
            print(f"{name:<16} {seconds:8.2f} {seconds / cold:8.3f} {stages:>10} {encoded:>16}")


if __name__ == "__main__":
    main()
