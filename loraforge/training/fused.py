"""Memory savers for mode full: the fused backward pass and bf16 weights (`finetune.fused_backward`,
`finetune.weights_dtype`, `finetune.stochastic_rounding`).

Fused backward (kohya's `--fused_backward_pass`, OneTrainer's "fused back pass"): each trained
parameter gets its own optimizer of the configured class and arguments, stepped in the
parameter's post-accumulate-grad hook as soon as its gradient is complete; the gradient is then
dropped. The full set of gradients never exists: only those autograd is still passing along.
`max_grad_norm` then clips each parameter's gradient on its own (as kohya's and OneTrainer's
fused passes do): the global norm would need every gradient at once.

bf16 weights: the trained components are held in bfloat16 (weights and gradients 2 bytes); each
parameter steps in float32 through a proxy and is rounded back, stochastically by default
(`loraforge.training.stochastic_rounding`); optimizer states stay float32.

Both run on `PerParameterOptimizer`: a torch optimizer whose param groups hold the real
parameters (so the LR schedule, `applied_lrs`, zero_grad and the EMA work unchanged) and which
owns one optimizer per parameter; each takes its group's current LR when it steps.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from loraforge.errors import InputError
from loraforge.training.optimizers import ADAPTIVE
from loraforge.training.stochastic_rounding import rounding_generator, step_in_float32

Make = Callable[[list[dict[str, Any]]], torch.optim.Optimizer]


class PerParameterOptimizer(torch.optim.Optimizer):
    """One optimizer per parameter behind one optimizer's interface.

    Args:
        groups: named param groups (`{"name", "params", "lr"}`), the real parameters.
        make: builds the configured optimizer over param groups (class and arguments fixed).
        fused: step each parameter in its post-accumulate-grad hook and drop its gradient;
            `step()` then only closes the step. False: `step()` steps every parameter with a gradient.
        max_grad_norm: fused only: clip each parameter's gradient to this norm; 0 = off.
        stochastic: bf16 parameters round stochastically (else to nearest).
        seed: `finetune.seed` (the rounding's random bits).
    """

    def __init__(
        self,
        groups: list[dict[str, Any]],
        make: Make,
        fused: bool,
        max_grad_norm: float = 0.0,
        stochastic: bool = True,
        seed: int = 0,
    ) -> None:
        self.fused, self.max_grad_norm, self.stochastic, self.seed = fused, max_grad_norm, stochastic, seed
        self.steps = 0  # optimizer steps closed so far (the rounding's step)
        self.parts: list[torch.optim.Optimizer] = []
        self.proxies: list[torch.nn.Parameter | None] = []  # float32 stand-ins of bf16 parameters
        self.group_of: list[int] = []
        self.index: dict[torch.nn.Parameter, int] = {}
        self.stepped: set[int] = set()
        for g, group in enumerate(groups):
            for p in group["params"]:
                bf16 = p.dtype == torch.bfloat16
                proxy = torch.nn.Parameter(torch.empty(0, device=p.device)) if bf16 else None
                self.parts.append(make([{**group, "params": [proxy if bf16 else p]}]))
                self.proxies.append(proxy)
                self.group_of.append(g)
                self.index[p] = len(self.parts) - 1
                if fused:
                    p.register_post_accumulate_grad_hook(self._hook)
        super().__init__(groups, dict(self.parts[0].defaults) if self.parts else {})

    def step_param(self, p: torch.nn.Parameter) -> None:
        """Step one parameter with its group's current LR (its gradient must be set).

        Args:
            p: a trained parameter.
        """
        i = self.index[p]
        if i in self.stepped:
            raise RuntimeError(
                "`finetune.fused_backward`: a parameter's gradient completed twice in one backward "
                "(a parameter used in two places, or reentrant checkpointing); set `finetune.fused_backward: false`"
            )
        self.stepped.add(i)
        part = self.parts[i]
        part.param_groups[0]["lr"] = self.param_groups[self.group_of[i]]["lr"]  # the schedule drives every part
        proxy = self.proxies[i]
        if proxy is None:
            part.step()
            return
        generator = rounding_generator(self.seed, self.steps, i, p.device) if self.stochastic else None
        step_in_float32(part, proxy, p, generator)

    @torch.no_grad()
    def _hook(self, p: torch.nn.Parameter) -> None:
        """Fused backward: the gradient of `p` is complete: clip it, step, drop it."""
        if self.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_([p], self.max_grad_norm)
        self.step_param(p)
        p.grad = None

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        """Close the optimizer step: fused, the hooks already stepped; else step every parameter
        with a gradient (in order). Counts the step (the rounding's next random bits).

        Args:
            closure: unsupported (must be None).
        """
        if closure is not None:
            raise ValueError("PerParameterOptimizer.step takes no closure")
        if not self.fused:
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        self.step_param(p)
        self.stepped.clear()
        self.steps += 1

    def state_dict(self) -> dict[str, Any]:
        """The groups (LRs) and every part's state (moments, step counts), for resume."""
        own = super().state_dict()
        return {"param_groups": own["param_groups"], "parts": [o.state_dict() for o in self.parts], "steps": self.steps}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore `state_dict()`'s output (same parameters in the same order).

        Args:
            state_dict: from `state_dict`.
        """
        if len(state_dict["parts"]) != len(self.parts):
            raise ValueError(f"optimizer state has {len(state_dict['parts'])} parameters, this run {len(self.parts)}")
        super().load_state_dict({"state": {}, "param_groups": state_dict["param_groups"]})
        for part, saved in zip(self.parts, state_dict["parts"]):
            part.load_state_dict(saved)  # float states cast to the part's parameter: float32 for a proxy
        self.steps = state_dict["steps"]


def check_memory_savers(
    *,
    fused_backward: bool,
    weights_dtype: str,
    mode: str,
    optimizer: str,
    gradient_accumulation: int,
    mixed_precision: str,
    world: int,
) -> None:
    """Refuse what cannot work with fused backward or bf16 weights, naming the keys.

    Args:
        fused_backward: `finetune.fused_backward`.
        weights_dtype: `finetune.weights_dtype`.
        mode: `finetune.mode` (both need `full`).
        optimizer: `finetune.optimizer` (per-parameter optimizers: not the adaptive ones).
        gradient_accumulation: `finetune.gradient_accumulation` (fused: 1).
        mixed_precision: `finetune.mixed_precision` (fused: not fp16; bf16 weights: bf16).
        world: training processes (both: 1).
    """
    on = {"fused_backward: true": fused_backward, "weights_dtype: bfloat16": weights_dtype == "bfloat16"}
    savers = [setting for setting, enabled in on.items() if enabled]
    if not savers:
        return
    key = f"`finetune.{savers[0]}`"
    if mode != "full":
        raise InputError(f"{key} applies to `finetune.mode: full` only (mode is `{mode}`)")
    if optimizer in ADAPTIVE:
        raise InputError(
            f"{key} steps each parameter with its own optimizer: `finetune.optimizer: {optimizer}` learns one "
            "step size over all of them; use AdamW, AdamW8bit, Lion or Adafactor"
        )
    if weights_dtype == "bfloat16" and mixed_precision != "bf16":
        raise InputError(
            f"`finetune.weights_dtype: bfloat16` needs `finetune.mixed_precision: bf16` (is `{mixed_precision}`)"
        )
    if world > 1:
        raise InputError(
            f"{key} trains in one process: set `finetune.num_processes: 1` and no multi-process "
            f"`finetune.accelerate_config` (is {world} processes)"
        )
    if not fused_backward:
        return
    if gradient_accumulation > 1:
        raise InputError(
            f"{key} steps as each gradient completes: it needs `finetune.gradient_accumulation: 1` "
            f"(is {gradient_accumulation}); raise `finetune.batch_size` instead"
        )
    if mixed_precision == "fp16":
        raise InputError(
            f"{key} cannot unscale fp16 gradients before they are used: set `finetune.mixed_precision` to bf16 or no"
        )
