"""Direct LoRA training (`finetune.mode: lora`, as the 003 guide trains): low-rank adapters on
the base model's attention/MLP projections (and, with `conv_dim`, its ResNet convolutions),
saved in kohya's format so `extract` can pass the file through and `resize` still applies.

A LoRA module patches the forward of the layer it adapts (kohya's approach), so the base model's
module tree and state-dict names stay untouched:

    y = W x + (alpha / rank) · up(dropout(down(x)))        down: (rank, in), up: (out, rank)

`network_algo` loha, lokr and dora attach lycoris' modules instead, on the same targets
(`loraforge.training.lycoris_net`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from loraforge.lora.format import lora_targets
from loraforge.training.lycoris_net import ALGO_MODULES, LycorisNetwork


@dataclass(frozen=True)
class LoraSettings:
    """The LoRA part of the finetune params (mode lora); each field is the `finetune.` key of its name.

    Attributes:
        network_dim: rank of linear and 1×1 conv layers.
        network_alpha: their alpha; also the one alpha of the saved file.
        conv_dim: rank of k×k convolutions; 0: none are targeted.
        conv_alpha: their alpha.
        network_dropout: dropout on the rank activations.
        rank_dropout: drop whole rank channels per sample with this probability.
        module_dropout: skip a whole adapter for a step with this probability.
        network_algo: `lora` / `locon` (this module's LoRANetwork), `loha`, `lokr`, `dora`
            (lycoris modules: `loraforge.training.lycoris_net`).
        network_factor: LoKr's Kronecker factor (-1: the most balanced split).
        decompose_both: LoKr: also split the smaller Kronecker factor into a low-rank pair.
        use_tucker: LyCORIS' Tucker decomposition of k×k convolutions (loha, dora; refused for lokr).
    """

    network_dim: int = 16
    network_alpha: float = 8.0
    conv_dim: int = 0
    conv_alpha: float = 1.0
    network_dropout: float = 0.0
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    network_algo: str = "lora"
    network_factor: int = -1
    decompose_both: bool = False
    use_tucker: bool = False


class LoRAModule(nn.Module):
    """One adapter on an nn.Linear or nn.Conv2d.

    Args:
        base: the layer adapted (its weights stay frozen).
        rank: the LoRA rank (dim).
        alpha: scale numerator: the update is multiplied by alpha / rank.
        dropout: dropout on the rank activations (`network_dropout`).
        rank_dropout: drops whole rank channels per sample, rescaling the rest.
        module_dropout: skips the whole adapter for a step with this probability.
    """

    def __init__(
        self,
        base: nn.Module,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        rank_dropout: float = 0.0,
        module_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if isinstance(base, nn.Conv2d):
            self.down: nn.Module = nn.Conv2d(
                base.in_channels, rank, base.kernel_size, base.stride, base.padding, bias=False
            )
            self.up: nn.Module = nn.Conv2d(rank, base.out_channels, 1, bias=False)
        elif isinstance(base, nn.Linear):
            self.down, self.up = (
                nn.Linear(base.in_features, rank, bias=False),
                nn.Linear(rank, base.out_features, bias=False),
            )
        else:
            raise TypeError(f"LoRA needs an nn.Linear or nn.Conv2d, got {type(base).__name__}")
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.up.weight)  # starts as the identity update: the base model unchanged
        self.to(base.weight.device)
        self.rank, self.alpha, self.scale = rank, float(alpha), float(alpha) / rank
        self.dropout, self.rank_dropout, self.module_dropout = dropout, rank_dropout, module_dropout
        self.base_forward = base.forward
        base.forward = self.forward  # patch: the base layer now adds the LoRA update

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_forward(x)
        if self.training and self.module_dropout and torch.rand(()) < self.module_dropout:
            return out
        h = self.down(x.to(self.down.weight.dtype))  # (B, ..., rank) or (B, rank, h, w)
        scale = self.scale
        if self.training and self.dropout:
            h = F.dropout(h, p=self.dropout)
        if self.training and self.rank_dropout:
            conv = h.dim() == 4 and isinstance(self.down, nn.Conv2d)
            shape = (h.shape[0], self.rank, 1, 1) if conv else (h.shape[0], *[1] * (h.dim() - 2), self.rank)
            h = h * (torch.rand(shape, device=h.device) > self.rank_dropout).to(h.dtype)
            scale = scale / (1 - self.rank_dropout)  # keep the expected update
        return out + (self.up(h) * scale).to(out.dtype)

    def delta(self) -> torch.Tensor:
        """The weight update (alpha / rank) · up @ down, flattened to (out, in·kh·kw)."""
        up = self.up.weight.flatten(1)  # (out, rank)
        down = self.down.weight.flatten(1)  # (rank, in·kh·kw)
        return self.scale * up @ down


class LoRANetwork(nn.Module):
    """The adapters of one component, keyed by kohya name (`lora_unet_...`, `lora_te_...`).

    Args:
        model: the component (UNet or text encoder).
        targets: module name -> kohya name (from `loraforge.lora.format.lora_targets`).
        dim: rank of linear and 1×1 conv layers; alpha: their alpha.
        conv_dim: rank of k×k convolutions (0: none are targeted); conv_alpha: their alpha.
        dropout, rank_dropout, module_dropout: see `LoRAModule`.
    """

    def __init__(
        self,
        model: nn.Module,
        targets: dict[str, str],
        dim: int,
        alpha: float,
        conv_dim: int,
        conv_alpha: float,
        dropout: float = 0.0,
        rank_dropout: float = 0.0,
        module_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        layers = {}
        for module_name, kohya in targets.items():
            base = model.get_submodule(module_name)
            big_kernel = isinstance(base, nn.Conv2d) and base.kernel_size != (1, 1)
            if big_kernel and not conv_dim:
                continue
            rank, a = (conv_dim, conv_alpha) if big_kernel else (dim, alpha)
            layers[kohya] = LoRAModule(base, rank, a, dropout, rank_dropout, module_dropout)
        self.layers = nn.ModuleDict(layers)

    def kohya_state(self, alpha: float, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """kohya-format tensors with one alpha for the file: each layer's own alpha/rank is folded into `up`.

        Args:
            alpha: the file's alpha (`network_alpha`).
            state: this network's state dict to convert (e.g. its EMA); None = the live weights.
        """
        state = state if state is not None else self.state_dict()
        out = {}
        for name, m in self.layers.items():
            out[f"{name}.lora_down.weight"] = state[f"layers.{name}.down.weight"].detach()
            out[f"{name}.lora_up.weight"] = state[f"layers.{name}.up.weight"].detach() * (
                m.alpha / alpha
            )  # loaders apply alpha/rank
            out[f"{name}.alpha"] = torch.tensor(float(alpha))
        return out


def add_lora(model: nn.Module, arch: str, component: str, s: LoraSettings) -> LoRANetwork | LycorisNetwork:
    """Freeze `model` and attach adapters to its LoRA targets (kohya's choice of layers): a
    `LoRANetwork` (`network_algo` lora / locon) or a `LycorisNetwork` (loha, lokr, dora).

    Args:
        model: the UNet or a text encoder.
        arch: `sd15` or `sdxl`.
        component: `unet`, `text_encoder` or `text_encoder_2`.
        s: ranks, alphas and dropouts.
    """
    model.requires_grad_(False)
    config = dict(model.config) if component == "unet" else None
    targets = lora_targets(arch, component, model.state_dict().keys(), conv=s.conv_dim > 0, unet_config=config)  # type: ignore[arg-type]
    if s.network_algo in ALGO_MODULES:
        return LycorisNetwork.create(model, targets, s)
    return LoRANetwork(
        model,
        targets,
        s.network_dim,
        s.network_alpha,
        s.conv_dim,
        s.conv_alpha,
        s.network_dropout,
        s.rank_dropout,
        s.module_dropout,
    )


@torch.no_grad()
def scale_weight_norms(networks: list[LoRANetwork | LycorisNetwork], max_norm: float) -> tuple[int, float]:
    """Shrink every layer whose update ‖(alpha/rank)·up@down‖ exceeds `max_norm` (the 003 guide: 1).

    Both factors are scaled by √(max_norm / norm), so the update's norm becomes max_norm.
    Returns (layers scaled, mean norm before scaling).

    Args:
        networks: the LoRA networks.
        max_norm: `finetune.scale_weight_norms`.
    """
    scaled, norms = 0, []
    for net in networks:
        if isinstance(net, LycorisNetwork):  # LoHa / LoKr: scales the factor ΔW is linear in
            n, layer_norms = net.scale_norms(max_norm)
            scaled, norms = scaled + n, norms + layer_norms
            continue
        for m in net.layers.values():
            norm = m.delta().norm().item()
            norms.append(norm)
            if norm > max_norm:
                ratio = math.sqrt(max_norm / norm)
                m.up.weight.mul_(ratio)
                m.down.weight.mul_(ratio)
                scaled += 1
    return scaled, sum(norms) / max(len(norms), 1)
