"""LyCORIS (LoHa, LoKr) and DoRA adapters in kohya-format files, through the `lycoris-lora` package.

`finetune.network_algo` trains these (`loraforge.training.lycoris_net`); this module holds what
training, the load-back tests and evaluation share: which algorithm a file holds, and building
lycoris' modules from a file onto a model's layers. Files name layers exactly as plain LoRA files
do (`lora_unet_...`, `lora_te_...`, SDXL UNet in sgm names: `loraforge.lora.format.lora_targets`), with
LyCORIS' suffixes, the keys ComfyUI's and A1111's LoRA loaders map:

    loha   <name>.hada_w1_a (out, r)  .hada_w1_b (r, in·k·k)  .hada_w2_a  .hada_w2_b  .alpha
           ΔW = (alpha/r) · (w1_a @ w1_b) ⊙ (w2_a @ w2_b)
    lokr   <name>.lokr_w1 (a, c)  or .lokr_w1_a/.lokr_w1_b;  .lokr_w2 (b, d) or .lokr_w2_a/.lokr_w2_b;  .alpha
           ΔW = (alpha/r) · w1 ⊗ w2          (out = a·b, in = c·d)
    dora   <name>.lora_down.weight  .lora_up.weight  .alpha  .dora_scale (out, 1[, 1, 1])
           W' = dora_scale · (W + ΔW) / ‖W + ΔW‖ (norm per output row), ΔW the LoRA update

diffusers (0.42) `load_lora_weights` does not apply these: it drops `dora_scale` and has no LoHa /
LoKr support for SD files, so evaluation renders them through `DeltaAdapter` instead.
"""

from __future__ import annotations

from typing import Any, Literal, Mapping

import torch
from torch import Tensor, nn

from loraforge.lora.format import PREFIXES, lora_targets

Algo = Literal["lora", "loha", "lokr", "dora"]
# the key suffix that tells each algorithm apart (checked in this order)
ALGO_SUFFIXES: tuple[tuple[Algo, tuple[str, ...]], ...] = (
    ("loha", (".hada_w1_a",)),
    ("lokr", (".lokr_w1", ".lokr_w1_a")),
    ("dora", (".dora_scale",)),
)


def file_algo(tensors: Mapping[str, Tensor]) -> Algo:
    """The algorithm of a LoRA state dict: `loha`, `lokr`, `dora` (LoRA + `.dora_scale`) or `lora`.

    Args:
        tensors: a kohya-format LoRA / LyCORIS state dict.
    """
    for algo, suffixes in ALGO_SUFFIXES:
        if any(key.endswith(suffixes) for key in tensors):
            return algo
    return "lora"


def refuse_tucker_lokr(tensors: Mapping[str, Tensor], where: Any) -> None:
    """Stop, naming the file, on a LoKr whose convolutions are Tucker-decomposed (`.lokr_t1` /
    `.lokr_t2`): LyCORIS' loader fails on them, ComfyUI skips those layers and Forge raises, so
    no render of it means what it would elsewhere. loraforge no longer writes them
    (`finetune.use_tucker` is refused with `network_algo: lokr`); older files stop here.

    Args:
        tensors: a LoRA state dict.
        where: the file, for the message.

    Raises:
        InputError: the file holds Tucker LoKr layers.
    """
    from loraforge.errors import InputError

    layers = sorted({k.rsplit(".", 1)[0] for k in tensors if k.endswith((".lokr_t1", ".lokr_t2"))})
    if layers:
        raise InputError(
            f"{where}: a LoKr with Tucker-decomposed convolutions ({len(layers)} layers, e.g. {layers[0]}), "
            "which no LoRA loader reads the same way: retrain it with `finetune.use_tucker: false`"
        )


def component_targets(model: nn.Module, arch: str, component: str) -> dict[str, str]:
    """Module name -> kohya name of every layer a file may adapt in `model` (convolutions included).

    Args:
        model: the UNet or a text encoder.
        arch: `sd15` or `sdxl`.
        component: `unet`, `text_encoder` or `text_encoder_2`.
    """
    config = dict(model.config) if component == "unet" else None  # type: ignore[arg-type]
    return lora_targets(arch, component, model.state_dict().keys(), conv=True, unet_config=config)  # type: ignore[arg-type]


@torch.no_grad()
def modules_from_weights(model: nn.Module, targets: Mapping[str, str], tensors: Mapping[str, Tensor]) -> dict[str, Any]:
    """lycoris modules (kohya name -> module, not yet applied) built from a file's tensors onto
    `model`'s layers, by lycoris' own loader (`lycoris.modules.get_module` / `make_module`).

    Args:
        model: the UNet or a text encoder (not modified).
        targets: module name -> kohya name (`component_targets`).
        tensors: the file's tensors (may hold other components' layers too).
    """
    from lycoris.modules import get_module, make_module

    present = {key.split(".", 1)[0] for key in tensors}
    out = {}
    for module_name, kohya in targets.items():
        if kohya not in present:
            continue
        kind, params = get_module(tensors, kohya)
        if kind is None:
            raise ValueError(f"LoRA layer `{kohya}`: no LyCORIS algorithm matches its keys")
        base = model.get_submodule(module_name)
        params = tuple(p.float() if isinstance(p, Tensor) else p for p in params)
        out[kohya] = make_module(kind, params, kohya, base).to(base.weight.device)
    return out


def layer_update(module: Any) -> Tensor:
    """A lycoris module's ΔW at strength 1, as its training forward computes it (float32, the
    layer's shape). Not lycoris' `get_diff_weight`: in lycoris-lora 4.1.3 that applies alpha/r
    twice for LoHa and LoKr (`get_weight` already scales); ComfyUI and A1111 scale once, as the
    forward does.

    Args:
        module: a LoConModule, LohaModule or LokrModule (with or without weight decomposition).
    """
    if hasattr(module, "make_weight"):  # LoCon / DoRA: (alpha/r) · up @ down
        diff = module.make_weight(module.device) * module.scale
    else:
        diff = module.get_weight(module.shape) * module.scalar
    return diff.reshape(module.org_weight.shape).float()  # (out, in) or (out, in, kh, kw)


def unused_layers(tensors: Mapping[str, Tensor], used: set[str]) -> list[str]:
    """Kohya names in `tensors` that no component's targets matched (a file for another model).

    Args:
        tensors: the file's tensors.
        used: the kohya names that were applied.
    """
    return sorted({key.split(".", 1)[0] for key in tensors} - used)


class DeltaAdapter:
    """A LyCORIS / DoRA file applied to loaded models as fixed weight changes at a strength:
    each adapted layer computes `layer(x) + strength · op(x, ΔW)` with ΔW = W' − W the file's
    change at full strength (for DoRA the whole re-normalised weight minus the base), so
    strength 0 is the base model and 1 is the file as trained (ComfyUI's reading of a strength).

    The base weights are never modified; `remove` restores each layer's forward. ΔW is kept in
    the layer's dtype and device (memory: one more copy of every adapted weight).

    Args:
        models: component name (`unet`, `text_encoder`, `text_encoder_2`) -> loaded module.
        arch: `sd15` or `sdxl`.
        tensors: the file's tensors.
        strength: the initial strength.
    """

    def __init__(
        self, models: Mapping[str, nn.Module | None], arch: str, tensors: Mapping[str, Tensor], strength: float = 1.0
    ):
        self.strength = strength
        self._restore: list[tuple[nn.Module, Any]] = []
        used: set[str] = set()
        for component, model in models.items():
            if model is None or component not in PREFIXES[arch]:
                continue
            targets = component_targets(model, arch, component)
            by_kohya = {kohya: name for name, kohya in targets.items()}
            for kohya, module in modules_from_weights(model, targets, tensors).items():
                self._patch(model.get_submodule(by_kohya[kohya]), module)
                used.add(kohya)
        left = unused_layers(tensors, used)
        if left:
            self.remove()
            raise ValueError(f"LoRA layer `{left[0]}` (and {len(left) - 1} more) matches no layer of the {arch} model")

    @torch.no_grad()
    def _patch(self, base: nn.Module, module: Any) -> None:
        weight = base.weight  # (out, in) or (out, in, kh, kw)
        module.eval()
        merged = weight.float() + layer_update(module).to(weight.device)
        if module.wd:  # DoRA: rescale each output row to the learned magnitude
            merged = module.apply_weight_decompose(merged, 1.0).float()
        delta = (merged - weight.float()).to(weight.dtype)  # W' − W at full strength
        op, kw, forward = module.op, dict(module.kw_dict), base.forward
        own = base.__dict__.get("forward")  # None: the class's forward (nothing patched before)

        def patched(x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
            out = forward(x, *args, **kwargs)
            if not self.strength:
                return out
            return out + self.strength * op(x, delta.to(x.dtype), None, **kw)

        base.forward = patched
        self._restore.append((base, own))

    def remove(self) -> None:
        """Restore every adapted layer's own forward."""
        for base, own in reversed(self._restore):
            if own is None:
                del base.forward
            else:
                base.forward = own
        self._restore.clear()
