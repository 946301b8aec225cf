"""Extraction speed, error and memory: `extract.svd: full` vs `lowrank` on SDXL-shaped deltas.

    python benchmarks/extract.py [--dim 128] [--device cpu|cuda] [--memory-mb 400] [--no-conv]

1. Speed and error. For every distinct LoRA-target weight shape of the real SDXL UNet (from the
   shipped config, built on the meta device), a synthetic finetune delta — a random low-rank
   structure with a decaying spectrum plus dense noise — is truncated to `--dim` by both methods.
   Times and squared errors are weighted by how many layers have that shape, so the totals are
   those of one whole SDXL UNet extraction. Prints the time ratio full / lowrank and both
   relative Frobenius errors (‖delta − up·down‖ / ‖delta‖ over the whole UNet).
2. Memory. Writes a synthetic float16 UNet-named model of `--memory-mb` (base and tuned) to a
   temp folder and extracts it in a subprocess; prints the peak-RSS growth of that process over
   its pre-extraction peak, as a ratio of one model's file size (goal: < 1.3).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from loraforge.lora import format as L  # noqa: E402
from loraforge.lora import svd as lora_svd  # noqa: E402
from loraforge.models.kohya_names import load_real_config, unet_targets  # noqa: E402


def sdxl_target_shapes(conv: bool) -> Counter[tuple[int, ...]]:
    """Weight shape → number of LoRA-target layers of the real SDXL UNet with that shape.

    Args:
        conv: include the ResNet / resampler convolutions (`conv_dim` > 0).
    """
    from diffusers import UNet2DConditionModel

    config = {k: v for k, v in load_real_config("sdxl").items() if not k.startswith("_")}
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    state = unet.state_dict()
    return Counter(tuple(state[f"{m}.weight"].shape) for m in unet_targets(state, conv=conv))


def synthetic_delta(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """A finetune-like delta: rank-256 structure with a 1/(1 + i/16) spectrum plus 2% dense noise.

    Args:
        shape: (out, in) or (out, in, kh, kw).
        seed: generator seed.
    """
    g = torch.Generator().manual_seed(seed)
    out_dim, in_flat = shape[0], int(torch.tensor(shape[1:]).prod())
    k = min(256, out_dim, in_flat)
    spectrum = 1.0 / (1.0 + torch.arange(k) / 16.0)  # (k,)
    u = torch.linalg.qr(torch.randn(out_dim, k, generator=g))[0]  # (out, k)
    v = torch.linalg.qr(torch.randn(in_flat, k, generator=g))[0]  # (in_flat, k)
    delta = (u * spectrum) @ v.T  # (out, in_flat)
    delta += 0.02 * delta.norm() / (out_dim * in_flat) ** 0.5 * torch.randn(out_dim, in_flat, generator=g)
    return delta.reshape(shape)


def time_method(delta: torch.Tensor, dim: int, svd: str, device: str) -> tuple[float, float]:
    """(seconds, squared Frobenius error) of one extraction of `delta` at `dim` with `svd`.

    Args:
        delta: the weight difference.
        dim: the rank.
        svd: `full` or `lowrank`.
        device: where it runs.
    """
    delta = delta.to(device)
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    up, down = lora_svd.extract_layer(delta, dim, svd=svd)  # type: ignore[arg-type]
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    err = float((L.merge_layer(up, down, float(down.shape[0])) - delta).double().pow(2).sum())
    return seconds, err


def speed(dim: int, device: str, conv: bool) -> dict[str, float]:
    """Run part 1 and print a per-shape table; returns the totals.

    Args:
        dim: the rank.
        device: where the SVDs run.
        conv: include the convolutions.
    """
    shapes = sdxl_target_shapes(conv)
    totals = {"full_s": 0.0, "lowrank_s": 0.0, "full_err2": 0.0, "lowrank_err2": 0.0, "norm2": 0.0}
    print(
        f"{'shape':>24} {'layers':>6} {'full s':>8} {'lowrank s':>9} {'ratio':>6} {'full err':>9} {'lowrank err':>11}"
    )
    lora_svd.extract_layer(torch.randn(64, 64, device=device), 8)  # warm LAPACK / cuSOLVER
    for i, (shape, count) in enumerate(
        sorted(shapes.items(), key=lambda kv: -kv[0][0] * int(torch.tensor(kv[0][1:]).prod()))
    ):
        delta = synthetic_delta(shape, i)
        norm2 = float(delta.double().pow(2).sum())
        torch.manual_seed(i)
        t_full, e_full = time_method(delta, dim, "full", device)
        t_low, e_low = time_method(delta, dim, "lowrank", device)
        totals["full_s"] += count * t_full
        totals["lowrank_s"] += count * t_low
        totals["full_err2"] += count * e_full
        totals["lowrank_err2"] += count * e_low
        totals["norm2"] += count * norm2
        print(
            f"{str(shape):>24} {count:>6} {t_full:>8.3f} {t_low:>9.3f} {t_full / t_low:>6.1f} "
            f"{(e_full / norm2) ** 0.5:>9.4f} {(e_low / norm2) ** 0.5:>11.4f}"
        )
    full_err, low_err = (
        (totals["full_err2"] / totals["norm2"]) ** 0.5,
        (totals["lowrank_err2"] / totals["norm2"]) ** 0.5,
    )
    print(f"\nwhole SDXL UNet ({sum(shapes.values())} layers, dim {dim}, {device}):")
    print(f"  full     {totals['full_s']:8.1f} s   relative Frobenius error {full_err:.5f}")
    print(f"  lowrank  {totals['lowrank_s']:8.1f} s   relative Frobenius error {low_err:.5f}")
    print(
        f"  time ratio full / lowrank: {totals['full_s'] / totals['lowrank_s']:.2f}x   "
        f"error lowrank vs full: {100 * (low_err / full_err - 1):+.3f}%"
    )
    return {"ratio": totals["full_s"] / totals["lowrank_s"], "full_err": full_err, "lowrank_err": low_err}


from tests.helpers import MEMORY_SCRIPT  # noqa: E402  (the same child script the memory test runs)


def write_model(path: Path, megabytes: int, seed: int) -> int:
    """A float16 UNet-named model of about `megabytes` MB, from SDXL attention shapes; returns its size.

    Args:
        path: the `.safetensors` file to write.
        megabytes: its approximate size.
        seed: generator seed (base and tuned differ everywhere).
    """
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    shapes = [(1280, 1280), (5120, 1280), (1280, 5120), (640, 640), (1280, 2048)]
    state, total, i = {}, 0, 0
    while total < megabytes * 1e6:
        shape = shapes[i % len(shapes)]
        state[f"down_blocks.2.attentions.0.transformer_blocks.{i}.attn1.to_q.weight"] = torch.randn(
            shape, generator=g
        ).half()
        total += shape[0] * shape[1] * 2
        i += 1
    save_file(state, path)
    return path.stat().st_size


def memory(megabytes: int, dim: int) -> dict[str, float]:
    """Run part 2 and print the peak-RSS growth ratio.

    Args:
        megabytes: size of the synthetic model.
        dim: the rank.
    """
    with tempfile.TemporaryDirectory() as tmp:
        base, tuned = Path(tmp) / "base.safetensors", Path(tmp) / "tuned.safetensors"
        size = write_model(base, megabytes, 0)
        write_model(tuned, megabytes, 1)
        out = subprocess.run(
            [sys.executable, "-c", MEMORY_SCRIPT, str(base), str(tuned), str(dim)],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        if out.returncode != 0:
            raise SystemExit(f"memory run failed:\n{out.stderr}")
    stats = json.loads(out.stdout.strip().splitlines()[-1])
    ratio = stats["growth"] / size
    print(
        f"\nmemory: one model {size / 1e6:.0f} MB (float16); "
        f"process peak RSS {stats['before'] / 1e6:.0f} MB before extracting, "
        f"{(stats['before'] + stats['growth']) / 1e6:.0f} MB after; growth {stats['growth'] / 1e6:.0f} MB "
        f"= {ratio:.3f}x one model (goal < 1.3; the LoRA itself is {stats['lora_bytes'] / 1e6:.1f} MB)"
    )
    return {"model_mb": size / 1e6, "growth_mb": stats["growth"] / 1e6, "ratio": ratio}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--memory-mb", type=int, default=400, help="size of the synthetic model for the memory run; 0 skips it"
    )
    parser.add_argument("--no-conv", action="store_true", help="attention layers only (conv_dim 0)")
    parser.add_argument("--memory-only", action="store_true", help="skip the speed run")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}")
    if not args.memory_only:
        speed(args.dim, args.device, conv=not args.no_conv)
    if args.memory_mb:
        memory(args.memory_mb, args.dim)


if __name__ == "__main__":
    main()
