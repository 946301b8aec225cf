"""Optimizers by name (`finetune.optimizer`) with extra constructor arguments (`finetune.optimizer_args`).

Known names map to their package; anything else written as `module.Class` is imported. The
adaptive optimizers (Prodigy, DAdaptation) keep a step size `d` in each param group: the LR they
actually apply is d·lr, which `applied_lrs` reports (the 004 guide's DLR graph).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any
from loraforge.errors import InputError

if TYPE_CHECKING:
    import torch

# name -> (module, class, pip package); the 003 guide's Prodigy arguments are in docs/training.md.
OPTIMIZERS: dict[str, tuple[str, str, str]] = {
    "AdamW": ("torch.optim", "AdamW", "torch"),
    "AdamW8bit": ("bitsandbytes.optim", "AdamW8bit", "bitsandbytes"),
    "Lion": ("lion_pytorch", "Lion", "lion-pytorch"),
    "Prodigy": ("prodigyopt", "Prodigy", "prodigyopt"),
    "DAdaptAdam": ("dadaptation", "DAdaptAdam", "dadaptation"),
    "Adafactor": ("transformers.optimization", "Adafactor", "transformers"),
}
ADAPTIVE = {"Prodigy", "DAdaptAdam"}  # learn a step size d shared by all param groups
# Adafactor with an external LR schedule: its own relative step size must be off.
DEFAULT_ARGS: dict[str, dict[str, Any]] = {
    "Adafactor": {"scale_parameter": False, "relative_step": False, "warmup_init": False}
}


def optimizer_class(name: str, device_type: str) -> type:
    """The optimizer class for `finetune.optimizer`.

    Args:
        name: a key of OPTIMIZERS, or `module.Class` of any importable optimizer.
        device_type: `cuda` or `cpu` (bitsandbytes' 8-bit optimizers run on both).
    """
    if name in OPTIMIZERS:
        module_name, cls_name, package = OPTIMIZERS[name]
    elif "." in name:
        module_name, cls_name = name.rsplit(".", 1)
        package = module_name.split(".")[0]
    else:
        raise InputError(
            f"`finetune.optimizer` = {name!r}: not one of {', '.join(OPTIMIZERS)} and not a `module.Class` path"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise InputError(
            f"`finetune.optimizer: {name}` needs the `{package}` package (pip install {package}): {e}"
        ) from e
    cls = getattr(module, cls_name, None)
    if not isinstance(cls, type):
        raise InputError(f"`finetune.optimizer` = {name!r}: {module_name} has no class {cls_name}")
    return cls


def yaml_to_kwargs(args: dict[str, Any]) -> dict[str, Any]:
    """YAML lists become tuples (`betas: [0.9, 0.99]` -> (0.9, 0.99)), as optimizers expect."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in args.items()}


def make_optimizer(
    name: str, groups: list[dict[str, Any]], args: dict[str, Any], weight_decay: float, device_type: str
) -> "torch.optim.Optimizer":
    """Build the optimizer over named param groups (`{"name", "params", "lr"}`).

    Args:
        name: `finetune.optimizer`.
        groups: one group per trained component, each with its own LR.
        args: `finetune.optimizer_args`, passed to the constructor (they win over the defaults).
        weight_decay: `finetune.weight_decay`, passed unless `args` sets it.
        device_type: `cuda` or `cpu`.
    """
    cls = optimizer_class(name, device_type)
    kwargs = {**DEFAULT_ARGS.get(name, {}), "weight_decay": weight_decay, **yaml_to_kwargs(args)}
    try:
        return cls(groups, **kwargs)
    except TypeError as e:
        raise InputError(f"`finetune.optimizer_args` = {args!r} do not fit {cls.__module__}.{cls.__name__}: {e}") from e


def applied_lrs(optimizer: Any) -> dict[str, float]:
    """The LR each param group actually applies this step: lr, or d·lr for adaptive optimizers.

    Args:
        optimizer: a torch optimizer (or accelerate's wrapper) whose groups carry a `name`.
    """
    return {
        g.get("name", str(i)): float(g["lr"]) * float(g.get("d", 1.0)) for i, g in enumerate(optimizer.param_groups)
    }
