"""Exponential moving average of the trained weights (the 001 guide: `--ema_decay=0.9995`).

After every optimizer step: shadow ← decay · shadow + (1 − decay) · weight, in float32 whatever
the training precision. Saved beside each checkpoint as `ema/<component>.safetensors`.
"""

from __future__ import annotations

from typing import Any

import torch
from loraforge.errors import InputError


class EMA:
    """Float32 shadow copies of the trainable parameters of some components.

    Args:
        components: name -> module (unwrapped); only parameters with requires_grad are averaged.
        decay: the EMA decay in (0, 1).
    """

    def __init__(self, components: dict[str, torch.nn.Module], decay: float) -> None:
        if not 0 < decay < 1:
            raise InputError(f"`finetune.ema_decay` must be in (0, 1), got {decay}")
        self.decay = decay
        self.components = components
        self.shadow: dict[str, dict[str, torch.Tensor]] = {
            name: {k: p.detach().float().clone() for k, p in m.named_parameters() if p.requires_grad}
            for name, m in components.items()
        }

    @torch.no_grad()
    def update(self) -> None:
        """One EMA step towards the current weights."""
        for name, module in self.components.items():
            shadow = self.shadow[name]
            for k, p in module.named_parameters():
                if k in shadow:
                    shadow[k].lerp_(p.detach().float(), 1 - self.decay)  # s + (1-d)(p - s) = d·s + (1-d)·p

    def state_dict(self, name: str) -> dict[str, torch.Tensor]:
        """Component `name`'s full state dict with the averaged parameters in place of the raw ones."""
        state = dict(self.components[name].state_dict())
        state.update(self.shadow[name])
        return state

    def to_save(self) -> dict[str, torch.Tensor]:
        """All shadows as one flat dict (`<component>/<param>`) for the resume state."""
        return {f"{name}/{k}": v for name, shadow in self.shadow.items() for k, v in shadow.items()}

    def load(self, flat: dict[str, Any]) -> None:
        """Restore shadows saved by `to_save`."""
        for key, value in flat.items():
            name, k = key.split("/", 1)
            self.shadow[name][k].copy_(value)
