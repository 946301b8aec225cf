"""Peak memory of a few full-finetune steps with and without the memory savers (fused backward,
bf16 weights), side by side, on CPU, with the estimate of `loraforge.planning.memory` beside each.

    python benchmarks/memory_savers.py [--width 64] [--latent 32] [--steps 3]

The model is SD1.5's UNet layout at `width` channels in its first block (64: 37.5 M parameters),
trained with AdamW and gradient checkpointing on random latents and context, as
tests/memory_probe.py does: each setting runs in a child process; measured is the peak RSS
(VmHWM) during the steps minus the RSS before them (the loaded, cast model; the peak reset at that
point through /proc/self/clear_refs, after a warm-up forward/backward whose gradients are dropped),
with a fixed mmap threshold so freed blocks return to the system at once. "total" adds the RSS
before the steps (the bf16 weights' own saving shows there); "vs plain" is each growth over the
plain fp32 run's, measured in the same invocation. Linux only.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SETTINGS = {  # label -> (mixed_precision, fused_backward, weights_dtype)
    "plain fp32": ("no", False, "float32"),
    "fused fp32": ("no", True, "float32"),
    "plain bf16 autocast": ("bf16", False, "float32"),
    "bf16 weights": ("bf16", False, "bfloat16"),
    "bf16 weights + fused": ("bf16", True, "bfloat16"),
}


def status(field: str) -> int:
    """Bytes of a /proc/self/status field (VmRSS, VmHWM)."""
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def unet_config(width: int) -> dict[str, Any]:
    """SD1.5's shipped UNet config with block_out_channels scaled so the first is `width`."""
    path = REPO / "loraforge" / "assets" / "configs" / "sd15-unet.json"
    config = {k: v for k, v in json.loads(path.read_text()).items() if k[0] != "_"}
    first = config["block_out_channels"][0]
    config["block_out_channels"] = [c * width // first for c in config["block_out_channels"]]
    return config


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """Run the steps of one setting in this process; the measured bytes."""
    import torch
    from diffusers import UNet2DConditionModel

    from loraforge.training.fused import PerParameterOptimizer

    torch.set_num_threads(1)
    torch.manual_seed(0)
    mixed, fused, dtype = SETTINGS[spec["label"]]
    config = unet_config(spec["width"])
    unet = UNet2DConditionModel.from_config(config).train().requires_grad_(True)
    unet.enable_gradient_checkpointing()
    bf16 = dtype == "bfloat16"
    if bf16:
        torch.nn.Module.to(unet, torch.bfloat16)
    dim = config["cross_attention_dim"]

    def loss(latent: int) -> torch.Tensor:
        x, ctx = torch.randn(1, 4, latent, latent), torch.randn(1, 77, dim)  # (B, 4, h, w), (B, 77, D)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mixed == "bf16"):
            return unet(x, torch.tensor([500]), ctx).sample.float().pow(2).mean()

    loss(8).backward()  # warm-up: first-call allocations of the kernels
    unet.zero_grad(set_to_none=True)
    groups = [{"name": "unet", "params": list(unet.parameters()), "lr": 1e-5}]

    def adamw(g: list[dict[str, Any]]) -> torch.optim.Optimizer:
        return torch.optim.AdamW(g, lr=1e-5, weight_decay=1e-2)

    opt = PerParameterOptimizer(groups, adamw, fused) if fused or bf16 else adamw(groups)
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    before = status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    for _ in range(spec["steps"]):
        loss(spec["latent"]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return {"growth": status("VmHWM") - before, "before": before, "params": sum(p.numel() for p in unet.parameters())}


def estimate(label: str, width: int, latent: int) -> int:
    """`loraforge.planning.memory`'s peak less the weights, for the setting (what `growth` measures)."""
    from loraforge.planning import memory as m
    from loraforge.planning.model_sizes import build_architecture

    mixed, fused, dtype = SETTINGS[label]
    model = build_architecture("sd15", unet_config(width), [], 16, 0)
    s = m.Setup(
        mixed_precision=mixed,  # type: ignore[arg-type]
        gradient_checkpointing=True,
        latent=(latent, latent),
        device="cpu",
        fused_backward=fused,
        weights_dtype=dtype,  # type: ignore[arg-type]
    )
    terms = m.estimate(model, s)
    return m.peak(terms, s) - terms["weights unet"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--latent", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONPATH": str(REPO)}
    mib = 2**20
    print(f"SD1.5 layout, width {args.width}, latent {args.latent}x{args.latent}, AdamW, checkpointing, CPU")
    header = {"growth MiB": 10, "vs plain": 8, "estimate MiB": 12, "before MiB": 10, "total MiB": 10}
    print(f"{'setting':<22} " + " ".join(f"{h:>{width}}" for h, width in header.items()))
    plain = None  # the first setting's growth: every ratio is against it
    for label in SETTINGS:
        spec = {"label": label, "width": args.width, "latent": args.latent, "steps": args.steps}
        out = subprocess.run(
            [sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True, env=env
        )
        if out.returncode != 0:
            raise SystemExit(f"{label}: {out.stderr[-2000:]}")
        r = json.loads(out.stdout.strip().splitlines()[-1])
        est = estimate(label, args.width, args.latent)
        total, plain = r["growth"] + r["before"], plain or r["growth"]
        print(
            f"{label:<22} {r['growth'] / mib:>10.1f} {r['growth'] / plain:>7.2f}x {est / mib:>12.1f} "
            f"{r['before'] / mib:>10.1f} {total / mib:>10.1f}"
        )


if __name__ == "__main__":
    main()
