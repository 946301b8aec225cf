"""bf16 weights with stochastic rounding (`finetune.weights_dtype: bfloat16`, OneTrainer's weight dtype).

A bf16 weight keeps 8 bits of mantissa: an update smaller than half the gap to the next bf16
value (half an ulp, 2⁻⁹ of the weight's magnitude) is lost when the new value is rounded to the
nearest bf16, so at fine-tuning LRs most updates vanish. Stochastic rounding rounds up with
probability equal to where the value sits between its two bf16 neighbours: unbiased in
expectation, so tiny updates accumulate over steps as they would in float32.

The trick (OneTrainer's `copy_stochastic_`, Nerogar): a float32 value's upper 16 bits are its
bf16 truncation; add uniform random integers in [0, 2¹⁶) to its int32 view and clear the low 16
bits. The carry into the upper half happens with probability (low bits) / 2¹⁶, which is the
value's position between its neighbours (for negatives too: the int32 view is sign-magnitude
above the sign bit, so the carry moves away from zero).

The optimizer step itself runs in float32: `step_in_float32` upcasts one bf16 parameter and its
gradient into a float32 proxy parameter, steps the proxy's optimizer (whose states are therefore
float32), and rounds the result back. Only one parameter's float32 copy exists at a time.
"""

from __future__ import annotations

from typing import Any

import torch

LOW_BITS = 1 << 16  # a float32's mantissa bits below bf16's


def round_to_bf16(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """`x` rounded to bfloat16: stochastically with a generator, to nearest without one.

    Args:
        x: float32 values (any shape).
        generator: the random source (on `x`'s device), or None for round-to-nearest.
    """
    if generator is None:
        return x.to(torch.bfloat16)
    bits = x.contiguous().view(torch.int32)  # same shape, the float's bit pattern
    noise = torch.randint(0, LOW_BITS, x.shape, dtype=torch.int32, device=x.device, generator=generator)
    truncated = (bits + noise) & -LOW_BITS  # -2**16 = 0xFFFF0000: keep the upper 16 bits
    return truncated.view(torch.float32).to(torch.bfloat16)  # exact: the low bits are zero


def rounding_generator(seed: int, step: int, index: int, device: torch.device) -> torch.Generator:
    """The random bits for parameter `index` at optimizer step `step`: from (seed, step, index)
    alone, so a run is reproducible, a resumed run draws what the uninterrupted one drew, and the
    order parameters step in (fused backward hooks, or a loop) does not matter.

    Args:
        seed: `finetune.seed`.
        step: the optimizer step (0-based).
        index: the parameter's position among the trained parameters.
        device: where the parameter lives.
    """
    return torch.Generator(device=device).manual_seed((seed * 1_000_003 + step) * 1_000_033 + index)


@torch.no_grad()
def step_in_float32(
    optimizer: Any, proxy: torch.nn.Parameter, param: torch.nn.Parameter, generator: torch.Generator | None
) -> None:
    """Step a bf16 parameter in float32 through its proxy, then round the result back into it.

    Args:
        optimizer: the optimizer over `[proxy]` alone (its states float32, like the proxy).
        proxy: a float32 parameter that holds no data between steps.
        param: the bf16 parameter, with its (bf16) gradient.
        generator: stochastic rounding's random source, or None for round-to-nearest.
    """
    proxy.data = param.detach().float()  # the one float32 copy, for this step only
    proxy.grad = param.grad.float()
    optimizer.step()
    param.copy_(round_to_bf16(proxy.data, generator))
    proxy.grad = None
    proxy.data = torch.empty(0, device=param.device)
