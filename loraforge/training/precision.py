"""Mixed precision for the training loop: the autocast context and fp16 loss scaling.

bf16 goes through accelerate unchanged. fp16 is managed here with `torch.amp` on every device:
accelerate only scales losses on accelerators, so this one code path runs on CUDA for users and on
CPU in the tests. The loss is multiplied by a dynamic scale before backward so small fp16
gradients do not flush to zero; gradients are unscaled before clipping; a step whose gradients
hold inf/NaN is skipped and the scale halves, and after `growth_interval` clean steps it doubles
(kohya and diffusers do the same through accelerate's GradScaler).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch


def accelerate_mode(mixed_precision: str) -> str:
    """What to hand `Accelerator(mixed_precision=...)`: fp16 is handled by `MixedPrecision` itself.

    Args:
        mixed_precision: `finetune.mixed_precision` (`no`, `fp16`, `bf16`).
    """
    return "no" if mixed_precision == "fp16" else mixed_precision


class MixedPrecision:
    """Autocast and, for fp16, a `torch.amp.GradScaler` for one training run.

    Args:
        mixed_precision: `finetune.mixed_precision`.
        device: the training device.
        accelerator: the Accelerator (its autocast serves bf16 and `no`).
        init_scale: the first loss scale (65536, torch's default).
        growth_interval: clean steps before the scale doubles.
    """

    def __init__(
        self,
        mixed_precision: str,
        device: torch.device,
        accelerator: Any,
        init_scale: float = 2.0**16,
        growth_interval: int = 2000,
    ) -> None:
        self.fp16 = mixed_precision == "fp16"
        self.device = device
        self.accelerator = accelerator
        self.scaler = (
            torch.amp.GradScaler(device.type, init_scale=init_scale, growth_interval=growth_interval)
            if self.fp16
            else None
        )
        self.skipped = 0

    def autocast(self) -> Any:
        """The forward pass's context: fp16 autocast on the training device, else accelerate's."""
        if self.fp16:
            return torch.autocast(self.device.type, dtype=torch.float16)
        return self.accelerator.autocast() if self.accelerator is not None else contextlib.nullcontext()

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss to call backward on (scaled under fp16)."""
        return self.scaler.scale(loss) if self.scaler is not None else loss

    def unscale(self, optimizer: Any) -> None:
        """Divide the gradients by the scale in place (before clipping; once per step)."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: Any) -> bool:
        """Step the optimizer unless fp16 gradients overflowed; update the scale. True if it stepped."""
        if self.scaler is None:
            optimizer.step()
            return True
        before = self.scaler.get_scale()
        self.scaler.step(optimizer)
        self.scaler.update()
        stepped = self.scaler.get_scale() >= before  # the scale backs off exactly when inf/NaN was found
        self.skipped += not stepped
        return stepped

    @property
    def loss_scale(self) -> float | None:
        """The current loss scale (None without fp16)."""
        return self.scaler.get_scale() if self.scaler is not None else None
