"""LyCORIS and DoRA training (`finetune.network_algo: loha | lokr | dora`, mode lora), with the
`lycoris-lora` package's modules on the same layers, and under the same kohya names, as the plain
LoRA of `loraforge.training.lora_net` (kohya's targets: attention/MLP projections, plus the ResNet
and resampler convolutions with `conv_dim`). Each module patches its layer's forward, so the base
model's module tree and state-dict names stay untouched (as lycoris' own kohya network does):

    loha   ΔW = (alpha/r) · (w1_a @ w1_b) ⊙ (w2_a @ w2_b)                    (LyCORIS `algo=loha`)
    lokr   ΔW = (alpha/r) · w1 ⊗ (w2_a @ w2_b), factors from `network_factor` (LyCORIS `algo=lokr`)
    dora   W' = m · (W + ΔW_lora) / ‖W + ΔW_lora‖, m learned per output row   (LyCORIS `dora_wd`)

Files: `loraforge.lora.lycoris` (suffixes, loading back, rendering).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from loraforge.lora.lycoris import layer_update, modules_from_weights

# lycoris' module class of each algorithm (DoRA is LoCon with weight decomposition)
ALGO_MODULES = {"loha": "LohaModule", "lokr": "LokrModule", "dora": "LoConModule"}
# the factor of each algorithm's ΔW that `scale_weight_norms` scales (ΔW is linear in it)
NORM_FACTORS = ("hada_w1_a", "lokr_w1", "lokr_w1_a")


def make_module(kohya: str, base: nn.Module, rank: int, alpha: float, s: Any) -> Any:
    """One lycoris module on `base`, applied (its forward patched), on `base`'s device.

    Args:
        kohya: the layer's kohya name (lycoris' `lora_name`).
        base: the nn.Linear or nn.Conv2d adapted (frozen).
        rank: the rank (`network_dim`, or `conv_dim` for k×k convolutions).
        alpha: its alpha.
        s: the `LoraSettings` (algo, dropouts, `network_factor`, `decompose_both`, `use_tucker`).
    """
    import lycoris.modules as lm

    cls = getattr(lm, ALGO_MODULES[s.network_algo])
    extra: dict[str, Any] = {"use_tucker": s.use_tucker}
    if s.network_algo == "lokr":
        extra.update(factor=s.network_factor, decompose_both=s.decompose_both)
    if s.network_algo == "dora":
        extra.update(weight_decompose=True, wd_on_out=True)
    module = cls(
        kohya,
        base,
        1.0,
        rank,
        alpha,
        dropout=s.network_dropout,
        rank_dropout=s.rank_dropout,
        module_dropout=s.module_dropout,
        **extra,
    ).to(base.weight.device)
    module.apply_to()
    return module


class LycorisNetwork(nn.Module):
    """The lycoris modules of one component, keyed by kohya name; the same interface as
    `LoRANetwork` (`layers`, `kohya_state`) for saving, EMA, resume and max-norm.

    Args:
        layers: kohya name -> applied lycoris module.
        algo: `loha`, `lokr` or `dora`.
    """

    def __init__(self, layers: Mapping[str, nn.Module], algo: str) -> None:
        super().__init__()
        self.layers = nn.ModuleDict(dict(layers))
        self.algo = algo

    @classmethod
    def create(cls, model: nn.Module, targets: Mapping[str, str], s: Any) -> "LycorisNetwork":
        """New modules on `model`'s LoRA targets (k×k convolutions only with `conv_dim` > 0).

        Args:
            model: the UNet or a text encoder (frozen).
            targets: module name -> kohya name (`loraforge.lora.format.lora_targets`).
            s: the `LoraSettings`.
        """
        layers = {}
        for module_name, kohya in targets.items():
            base = model.get_submodule(module_name)
            big_kernel = isinstance(base, nn.Conv2d) and base.kernel_size != (1, 1)
            if big_kernel and not s.conv_dim:
                continue
            rank, alpha = (s.conv_dim, s.conv_alpha) if big_kernel else (s.network_dim, s.network_alpha)
            layers[kohya] = make_module(kohya, base, rank, alpha, s)
        return cls(layers, s.network_algo)

    @classmethod
    def from_file(cls, model: nn.Module, targets: Mapping[str, str], path: Path) -> "LycorisNetwork":
        """A network loaded back from a saved file onto `model` (lycoris' loader), applied.

        Args:
            model: the UNet or a text encoder (its layers get patched).
            targets: module name -> kohya name (`loraforge.lora.lycoris.component_targets`).
            path: the `.safetensors` file.
        """
        from loraforge.lora.format import load_lora
        from loraforge.lora.lycoris import file_algo

        tensors, _ = load_lora(path)
        layers = modules_from_weights(model, targets, tensors)
        for module in layers.values():
            module.apply_to()
        return cls(layers, file_algo(tensors))

    def kohya_state(self, alpha: float, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The file's tensors: `<kohya name>.<lycoris suffix>`, each layer with its own `.alpha`
        (as LyCORIS writes them; ComfyUI and A1111 read a per-layer alpha).

        Args:
            alpha: unused (the plain LoRA folds its alphas into one; LyCORIS files keep each layer's).
            state: this network's state dict to convert (e.g. its EMA); None = the live weights.
        """
        state = state if state is not None else self.state_dict()
        return {key.removeprefix("layers."): value.detach() for key, value in state.items()}

    @torch.no_grad()
    def scale_norms(self, max_norm: float) -> tuple[int, list[float]]:
        """Scale every layer whose ‖ΔW‖ exceeds `max_norm` down to it (`scale_weight_norms`, not DoRA).

        Returns (layers scaled, each layer's norm before scaling).

        Args:
            max_norm: `finetune.scale_weight_norms`.
        """
        scaled, norms = 0, []
        for m in self.layers.values():
            norm = layer_update(m).norm().item()
            norms.append(norm)
            if norm > max_norm:
                factor = next(getattr(m, name) for name in NORM_FACTORS if hasattr(m, name))
                factor.mul_(max_norm / norm)
                scaled += 1
        return scaled, norms
