"""Child process of tests/test_memory.py: a few real training steps on CPU, and the peak RSS growth
over the loaded model.

    python tests/memory_probe.py '{"unet": "builtin" | {...config}, "optimizer": "AdamW", ...}'

The loop is stage finetune's in miniature (stages/finetune.py): a UNet in float32, gradient
checkpointing as `trainable` enables it, the optimizer class `finetune.optimizer` names (with its
default arguments), noise on the latents (DDPM schedule), MSE against the noise, backward, clip,
step, gradients set to None, EMA. The context comes from the builtin's frozen text encoder (run
under no_grad, as with a cached or frozen encoder), or is random when the UNet is not a builtin's.

With `"fused": true` or `"bf16": true` the optimizer is `loraforge.training.fused`'s
PerParameterOptimizer (fused backward; bf16 weights under bf16 autocast, as the trainer requires).

Measured: VmHWM (peak RSS) after the steps minus VmRSS before them, with the peak reset at that
point (/proc/self/clear_refs), after a warm-up step on a small latent (first-call allocations of
the CPU kernels) whose gradients and optimizer state are dropped again. Prints one JSON line.
"""

from __future__ import annotations

import ctypes
import gc
import json
import sys
from pathlib import Path
from typing import Any

import torch


def status(field: str) -> int:
    """Bytes of a /proc/self/status field (VmRSS, VmHWM)."""
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def optimizer(name: str, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """The optimizer `finetune.optimizer` names, with loraforge's default arguments."""
    if name == "AdamW":
        return torch.optim.AdamW(params, lr=1e-5, weight_decay=1e-2)
    if name == "AdamW8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=1e-5, weight_decay=1e-2)
    if name == "Adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=1e-5, scale_parameter=False, relative_step=False, warmup_init=False)
    raise ValueError(name)


def models(spec: dict[str, Any]) -> tuple[Any, Any]:
    """(unet, encode) where encode(batch) gives the (B, 77, D) context."""
    from diffusers import UNet2DConditionModel

    if spec["unet"] == "builtin":
        from loraforge.models.tiny import build_tiny_sd15

        parts = build_tiny_sd15(0)
        tokenizer, encoder = parts["tokenizer"], parts["text_encoder"].eval().requires_grad_(False)

        def encode(batch: int) -> torch.Tensor:
            ids = tokenizer(["lfxstyle a shape"] * batch, padding="max_length", max_length=77, return_tensors="pt")
            with torch.no_grad():
                return encoder(ids.input_ids).last_hidden_state

        return parts["unet"], encode
    unet = UNet2DConditionModel.from_config(spec["unet"])
    dim = spec["unet"]["cross_attention_dim"]
    return unet, lambda batch: torch.randn(batch, 77, dim)


def step(unet: Any, opt: Any, encode: Any, latents: torch.Tensor, ema: dict[str, torch.Tensor] | None) -> float:
    """One training step (the finetune loop's order)."""
    from diffusers import DDPMScheduler

    noise_scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    noise = torch.randn_like(latents)
    t = torch.randint(0, 1000, (latents.shape[0],))
    noisy = noise_scheduler.add_noise(latents, noise, t)
    bf16 = next(unet.parameters()).dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        pred = unet(noisy, t, encode(latents.shape[0])).sample
    loss = torch.nn.functional.mse_loss(pred.float(), noise)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    if ema is not None:
        with torch.no_grad():
            for k, p in unet.named_parameters():
                ema[k].lerp_(p.detach(), 1e-3)
    return float(loss)


def main(spec: dict[str, Any]) -> dict[str, Any]:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    unet, encode = models(spec)
    unet.train().requires_grad_(True)
    if spec.get("checkpointing"):
        unet.enable_gradient_checkpointing()
    if spec.get("bf16"):
        torch.nn.Module.to(unet, torch.bfloat16)
    params = list(unet.parameters())
    h, w = spec["latent"]
    step(unet, optimizer(spec["optimizer"], params), encode, torch.randn(1, 4, 8, 8), None)  # warm-up
    unet.zero_grad(set_to_none=True)
    opt = optimizer(spec["optimizer"], params)
    if spec.get("fused") or spec.get("bf16"):
        from loraforge.training.fused import PerParameterOptimizer

        groups = [{"params": params, "lr": 1e-5}]
        opt = PerParameterOptimizer(
            groups, lambda g: optimizer(spec["optimizer"], g[0]["params"]), bool(spec.get("fused"))
        )
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    before = status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    ema = {k: p.detach().float().clone() for k, p in unet.named_parameters()} if spec.get("ema") else None
    losses = [step(unet, opt, encode, torch.randn(spec["batch"], 4, h, w), ema) for _ in range(spec.get("steps", 3))]
    return {
        "growth": status("VmHWM") - before,
        "before": before,
        "params": sum(p.numel() for p in params),
        "shapes": [list(p.shape) for p in params],
        "losses": losses,
    }


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))))
