"""Speed-up of per-item work on a Dask LocalCluster (issue 12): the latents stage (VAE encoding plus
the VAE check) over a few hundred generated images, in one process, on 1 Dask worker and on 2,
measured side by side in one run, each from an empty latent cache. Every run uses one torch thread
per chunk (`runner.threads: 1`), so the workers do not fight over the cores and all three write
the same bytes (checked).

    python benchmarks/fanout.py [--images 240] [--resolution 256]

On a machine with N free cores, 2 workers approach 2x over 1; the cluster's start-up (a few
seconds) is paid once per stage.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from loraforge.store.fingerprint import hash_tree  # noqa: E402
from loraforge.pipeline.runner import run_stage  # noqa: E402


def make_project(root: Path, images: int, resolution: int) -> Path:
    root.mkdir(parents=True)
    for name in ("pipeline.yaml", "params.yaml"):
        shutil.copy(REPO / name, root / name)
    src = root / "src"
    src.mkdir()
    rng = np.random.default_rng(0)
    for i in range(images):
        coarse = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
        w, h = [(resolution, resolution), (resolution * 5 // 4, resolution * 3 // 4)][i % 2]
        Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC).save(src / f"img_{i:04d}.png")
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["ingest"]["source"] = "src"
    params["dataset"] = {**params.get("dataset", {}), "near_duplicate_distance": -1}
    params["latents"].update({"resolution": resolution, "vae_check": True, "batch_size": 4})
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return root


def latents_run(root: Path, runner: dict) -> tuple[float, str]:
    """Seconds for the latents stage from an empty latent cache, and the hash of its outputs."""
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["runner"] = runner
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for kind in ("latent", "vae-check"):
        shutil.rmtree(root / ".loraforge" / "store" / kind, ignore_errors=True)
    started = time.perf_counter()
    run_stage(root, "latents")
    return time.perf_counter() - started, hash_tree(root / "data" / "latents")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=240)
    parser.add_argument("--resolution", type=int, default=256)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = make_project(Path(tmp) / "p", args.images, args.resolution)
        for stage in ("ingest", "upscale"):
            run_stage(root, stage)
        one_process = {"task_runner": "local", "threads": 1, "chunk_size": 16}
        local, digest = latents_run(root, one_process)
        dask1, digest1 = latents_run(root, {**one_process, "task_runner": "dask", "workers": 1})
        dask2, digest2 = latents_run(root, {**one_process, "task_runner": "dask", "workers": 2})
    same = digest == digest1 == digest2
    print(f"latents stage, {args.images} images at {args.resolution} px (VAE encode + check), 1 torch thread per chunk")
    print(f"  one process        : {local:7.1f} s")
    print(f"  Dask, 1 worker     : {dask1:7.1f} s")
    print(f"  Dask, 2 workers    : {dask2:7.1f} s   speed-up over 1 worker: {dask1 / dask2:.2f}x")
    print(f"  outputs identical  : {same}")


if __name__ == "__main__":
    main()
