"""Memory savers for mode full (`loraforge.training.fused`, `loraforge.training.stochastic_rounding`):
the fused backward step against the plain step, the refusals, stochastic rounding's unbiasedness
and what it does for tiny updates, resume of the per-parameter optimizer, and the memory estimate
of both options. The runs through the finetune stage are in tests/test_finetune_training.py."""

from __future__ import annotations

import copy
import dataclasses
import io
import math
from typing import Any, Callable

import pytest
import torch

from loraforge.planning import memory as m
from loraforge.errors import InputError
from loraforge.planning.memory import Architecture, ParamStats, Setup
from loraforge.planning.model_sizes import reference_architecture
from loraforge.training.fused import PerParameterOptimizer, check_memory_savers
from loraforge.training.schedules import make_lr_schedule
from loraforge.training.stochastic_rounding import round_to_bf16, rounding_generator
from tests.helpers import one_torch_thread


one_thread = pytest.fixture(scope="module", autouse=True)(one_torch_thread)


def stack() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        torch.nn.GroupNorm(2, 8),
        torch.nn.SiLU(),
        torch.nn.Conv2d(8, 8, 3, padding=1),
        torch.nn.Flatten(),
        torch.nn.Linear(8 * 6 * 6, 5),
    )


def adamw(groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(groups, lr=1e-2, weight_decay=1e-2)


def train_steps(
    model: torch.nn.Module, fused: bool | None, loss_of: Callable[[int], torch.Tensor], steps: int, seed: int = 0
) -> Any:
    """`steps` steps with a cosine schedule: the plain optimizer (`fused` None), else a
    PerParameterOptimizer (fused or stepped in a loop). Returns the optimizer."""
    groups = [{"name": "unet", "params": list(model.parameters()), "lr": 1e-2}]
    opt = adamw(groups) if fused is None else PerParameterOptimizer(groups, adamw, fused=fused, seed=seed)
    schedule = make_lr_schedule("cosine", opt, 1, steps, 1, 1.0)
    for step in range(steps):
        loss_of(step).backward()
        if fused:
            assert all(p.grad is None for p in model.parameters())  # stepped and dropped inside backward
        opt.step()
        schedule.step()
        opt.zero_grad(set_to_none=True)
    return opt


def stack_loss(model: torch.nn.Module) -> Callable[[int], torch.Tensor]:
    def loss(step: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(4, 3, 6, 6, generator=g), torch.randn(4, 5, generator=g)  # (B, C, H, W), (B, 5)
        dtype = next(model.parameters()).dtype
        return torch.nn.functional.mse_loss(model(x.to(dtype)).float(), y)

    return loss


def max_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


def test_fused_step_equals_the_plain_step_and_holds_one_gradient_at_a_time() -> None:
    plain, fused, looped = stack(), stack(), stack()
    train_steps(plain, None, stack_loss(plain), 6)
    held: list[int] = []
    for p in fused.parameters():  # registered first: runs before the optimizer's hook
        p.register_post_accumulate_grad_hook(lambda _: held.append(sum(q.grad is not None for q in fused.parameters())))
    train_steps(fused, True, stack_loss(fused), 6)
    train_steps(looped, False, stack_loss(looped), 6)
    assert max_diff(plain, stack()) > 1e-3  # it trained
    assert max_diff(fused, plain) < 1e-6 and max_diff(looped, plain) < 1e-6
    assert held and max(held) == 1  # when a gradient completes, every earlier one is gone already
    # bf16 weights: the rounding draws come from (seed, step, parameter), so fused and looped agree exactly
    bf16 = {fused: stack().to(torch.bfloat16) for fused in (True, False)}
    for fused, model in bf16.items():
        train_steps(model, fused, stack_loss(model), 4, seed=3)
    assert max_diff(bf16[True], bf16[False]) == 0 and max_diff(bf16[True], stack().to(torch.bfloat16)) > 0


def test_fused_step_on_a_real_tiny_unet_equals_the_plain_step_with_checkpointing_too() -> None:
    from loraforge.models.tiny import build_tiny_sd15

    unet = build_tiny_sd15(0)["unet"].train()
    copies = {name: copy.deepcopy(unet) for name in ("plain", "fused", "fused checkpointing")}
    copies["fused checkpointing"].enable_gradient_checkpointing()  # each segment's grads complete in its recompute

    def loss_of(model: torch.nn.Module) -> Callable[[int], torch.Tensor]:
        def loss(step: int) -> torch.Tensor:
            g = torch.Generator().manual_seed(step)
            x, ctx = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 32, generator=g)  # latents, context
            return model(x, torch.tensor([500]), ctx).sample.pow(2).mean()

        return loss

    for name, model in copies.items():
        train_steps(model, None if name == "plain" else True, loss_of(model), 2)
    assert max_diff(copies["plain"], unet) > 0
    assert max_diff(copies["fused"], copies["plain"]) < 1e-6
    assert max_diff(copies["fused checkpointing"], copies["plain"]) < 1e-6


def test_fused_clips_each_parameter_on_its_own() -> None:
    model = stack()
    groups = [{"params": list(model.parameters()), "lr": 1.0}]
    seen: dict[int, float] = {}
    opt = PerParameterOptimizer(groups, lambda g: torch.optim.SGD(g, lr=1.0), fused=True, max_grad_norm=1e-3)
    for part in opt.parts:
        part.register_step_pre_hook(lambda o, *_: seen.update({id(o): o.param_groups[0]["params"][0].grad.norm()}))
    (stack_loss(model)(0) * 1e3).backward()
    assert len(seen) == len(opt.parts) and all(n == pytest.approx(1e-3, rel=1e-4) for n in seen.values())


def test_a_gradient_completing_twice_in_one_backward_is_refused() -> None:
    layer = torch.nn.Linear(3, 3)
    opt = PerParameterOptimizer([{"params": list(layer.parameters()), "lr": 0.1}], adamw, fused=True)
    x = torch.randn(2, 3)
    layer(x).sum().backward()
    with pytest.raises(RuntimeError, match="completed twice in one backward"):
        layer(x).sum().backward()  # no step() closed the first one
    opt.step()


def settings(**overrides: Any) -> dict[str, Any]:
    base = dict(
        fused_backward=True,
        weights_dtype="float32",
        mode="full",
        optimizer="AdamW",
        gradient_accumulation=1,
        mixed_precision="no",
        world=1,
    )
    return {**base, **overrides}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"gradient_accumulation": 3},
            r"`finetune.fused_backward: true` .* `finetune.gradient_accumulation: 1` \(is 3\)",
        ),
        (
            {"mixed_precision": "fp16"},
            r"`finetune.fused_backward: true` cannot unscale fp16 .*`finetune.mixed_precision`",
        ),
        ({"world": 2}, r"`finetune.fused_backward: true` trains in one process: set `finetune.num_processes: 1`"),
        ({"mode": "lora"}, r"`finetune.fused_backward: true` applies to `finetune.mode: full` only"),
        ({"optimizer": "Prodigy"}, r"`finetune.fused_backward: true` .*`finetune.optimizer: Prodigy`"),
        (
            {"fused_backward": False, "weights_dtype": "bfloat16"},
            r"`finetune.weights_dtype: bfloat16` needs `finetune.mixed_precision: bf16` \(is `no`\)",
        ),
        (
            {"fused_backward": False, "weights_dtype": "bfloat16", "mixed_precision": "bf16", "world": 2},
            r"`finetune.weights_dtype: bfloat16` trains in one process",
        ),
    ],
)
def test_refusals_name_the_keys_on_one_line(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(InputError, match=message) as caught:
        check_memory_savers(**settings(**overrides))
    assert "\n" not in str(caught.value)


def test_the_savers_accept_what_they_run_with() -> None:
    check_memory_savers(**settings())
    check_memory_savers(**settings(weights_dtype="bfloat16", mixed_precision="bf16", optimizer="Adafactor"))
    check_memory_savers(**settings(fused_backward=False, mode="lora", gradient_accumulation=4, world=8))  # both off


# ---------------------------------------------------------------- stochastic rounding


def bf16_neighbours(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The bf16 values next to x, towards and away from zero."""
    down = (x.view(torch.int32) & -65536).view(torch.float32)
    up = ((x.view(torch.int32) & -65536) + 65536).view(torch.float32)
    return down, up


def test_stochastic_rounding_is_unbiased_and_round_to_nearest_is_not() -> None:
    n = 1 << 18
    ulp = 2.0**-7  # bf16's gap in [1, 2)
    for fraction in (0.1, 0.25, 0.5, 0.9):
        for sign in (1.0, -1.0):
            x = torch.full((n,), sign * (1.5 + fraction * ulp), dtype=torch.float64).float()
            drawn = round_to_bf16(x, torch.Generator().manual_seed(0)).double()
            down, up = bf16_neighbours(x[:1])
            assert set(drawn.unique().tolist()) == {down.item(), up.item()}  # only the two neighbours
            # each draw is a Bernoulli(fraction) step of one ulp: the mean's std is ulp·√(f(1-f)/n)
            bound = 5 * ulp * math.sqrt(fraction * (1 - fraction) / n)  # 5 sigma: ≤ 0.005 ulp here
            error = abs(drawn.mean().item() - x[0].item())
            assert error < bound < 0.01 * ulp, (fraction, sign, error, bound)
            nearest = abs(round_to_bf16(x[:1], None).double().item() - x[0].item())
            assert nearest >= min(fraction, 1 - fraction) * ulp * 0.999 > 20 * bound  # biased by the fraction
    exact = torch.tensor([1.0, -3.0, 0.0, 2.0**-120])  # representable values never move
    assert torch.equal(round_to_bf16(exact, torch.Generator().manual_seed(1)).float(), exact)


def test_rounding_draws_depend_on_seed_step_and_parameter_only() -> None:
    x = torch.full((1000,), 1.0 + 2.0**-9)
    cpu = torch.device("cpu")
    again = [round_to_bf16(x, rounding_generator(42, 3, 7, cpu)) for _ in range(2)]
    assert torch.equal(*again)
    assert not torch.equal(again[0], round_to_bf16(x, rounding_generator(42, 4, 7, cpu)))
    assert not torch.equal(again[0], round_to_bf16(x, rounding_generator(42, 3, 8, cpu)))


def tiny_updates(stochastic: bool | None, steps: int) -> torch.Tensor:
    """Weights at 1.0 after `steps` AdamW steps of LR 1e-4 on a constant gradient (each update
    ~1e-4, under half a bf16 ulp at 1.0, 2⁻⁸ ≈ 3.9e-3): float32 (`stochastic` None) or bf16."""
    w = torch.nn.Parameter(torch.ones(4096, dtype=torch.float32 if stochastic is None else torch.bfloat16))
    make = lambda g: torch.optim.AdamW(g, lr=1e-4, weight_decay=0.0)  # noqa: E731
    opt = make([{"params": [w]}]) if stochastic is None else None
    opt = opt or PerParameterOptimizer([{"params": [w], "lr": 1e-4}], make, False, stochastic=bool(stochastic))
    for _ in range(steps):
        w.grad = torch.full_like(w, 0.5)
        opt.step()
        assert w.dtype == (torch.float32 if stochastic is None else torch.bfloat16)
    return w.detach().double()


def test_tiny_updates_vanish_with_round_to_nearest_and_accumulate_with_stochastic_rounding() -> None:
    steps = 100
    fp32, nearest, stochastic = (tiny_updates(s, steps) for s in (None, False, True))
    moved = 1 - fp32.mean().item()
    assert moved == pytest.approx(steps * 1e-4, rel=1e-3)  # AdamW moves ~lr per step on a constant gradient
    assert torch.equal(nearest, torch.ones_like(nearest))  # every update rounded away
    # stochastic: each step's rounding error is a Bernoulli draw between neighbours ≤ 2⁻⁸ apart
    # here (below 1.0), mean 0, std ≤ 2⁻⁹: the per-weight sum over the steps has std ≤ √steps · 2⁻⁹,
    # the mean of 4096 weights 1/64 of that; 5 sigma
    bound = 5 * math.sqrt(steps) * 2.0**-9 / 64
    assert abs(stochastic.mean().item() - fp32.mean().item()) < bound < moved / 2


def test_resume_of_the_per_parameter_optimizer_continues_exactly() -> None:
    def make_run() -> tuple[torch.nn.Module, PerParameterOptimizer, Any]:
        model = stack().to(torch.bfloat16)
        groups = [{"name": "unet", "params": list(model.parameters()), "lr": 1e-2}]
        opt = PerParameterOptimizer(groups, adamw, fused=True, seed=5)
        return model, opt, make_lr_schedule("cosine", opt, 0, 6, 1, 1.0)

    def steps(model: torch.nn.Module, opt: Any, schedule: Any, start: int, stop: int) -> None:
        for step in range(start, stop):
            stack_loss(model)(step).backward()
            opt.step()
            schedule.step()

    straight = make_run()
    steps(*straight, 0, 6)
    first = make_run()
    steps(*first, 0, 3)
    buffer = io.BytesIO()
    torch.save({"optimizer": first[1].state_dict(), "schedule": first[2].state_dict()}, buffer)
    resumed = make_run()
    with torch.no_grad():
        for p, q in zip(resumed[0].parameters(), first[0].parameters()):
            p.copy_(q)
    blob = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    resumed[1].load_state_dict(blob["optimizer"])
    resumed[2].load_state_dict(blob["schedule"])
    assert resumed[1].parts[0].state[resumed[1].proxies[0]]["exp_avg"].dtype == torch.float32  # fp32 states
    steps(*resumed, 3, 6)
    assert max_diff(resumed[0], straight[0]) == 0 and resumed[1].steps == 6


# ---------------------------------------------------------------- the memory estimate


@pytest.fixture(scope="module")
def sdxl() -> Architecture:
    return reference_architecture("sdxl")


def test_memory_estimate_counts_fused_backward_and_bf16_weights(sdxl: Architecture) -> None:
    s = Setup(mixed_precision="bf16", gradient_checkpointing=True, latent=(128, 128))
    unet = sdxl.components["unet"].params
    n, largest = unet.numel, unet.largest
    plain = m.estimate(sdxl, s)
    assert plain["gradients"] == 4 * n and plain["optimizer step"] == 4 * n  # foreach AdamW on CUDA
    fused_s = dataclasses.replace(s, fused_backward=True)
    fused = m.estimate(sdxl, fused_s)
    assert fused["gradients"] == 4 * largest and fused["optimizer step"] == 2 * 4 * largest  # per-tensor steps
    assert m.phases(fused, fused_s)["step"] == 0
    assert m.phases(fused, fused_s)["backward"] == 4 * largest + fused["activations"] + 8 * largest
    bf16_s = dataclasses.replace(s, weights_dtype="bfloat16")
    bf16 = m.estimate(sdxl, bf16_s)
    assert bf16["weights unet"] == 2 * n == plain["weights unet"] / 2 and bf16["gradients"] == 2 * n
    assert bf16["optimizer state"] == plain["optimizer state"] == 8 * n  # float32 states through the proxy
    assert bf16["ema"] == plain["ema"] and bf16["weight casts"] == 0 < plain["weight casts"]
    assert bf16["optimizer step"] == (8 + 8) * largest  # per-tensor + the float32 proxy and gradient
    both_s = dataclasses.replace(bf16_s, fused_backward=True)
    both = m.estimate(sdxl, both_s)
    assert both["gradients"] == 2 * largest
    # peak: the savings the estimate prints are exactly the differences of the peaks
    found = dict(m.savings(sdxl, s))
    assert found["fused backward"] == m.peak(plain, s) - m.peak(fused, fused_s) > 0
    assert found["bf16 weights"] == m.peak(plain, s) - m.peak(bf16, bf16_s) > 0
    # what the trainer refuses is never offered: LoRA, fp16 accumulation runs, Prodigy
    lora = Setup(mode="lora", latent=(128, 128))
    assert m.estimate(sdxl, dataclasses.replace(lora, weights_dtype="bfloat16")) == m.estimate(sdxl, lora)
    assert not {"fused backward", "bf16 weights"} & set(dict(m.savings(sdxl, lora)))
    assert "fused backward" not in dict(m.savings(sdxl, dataclasses.replace(s, accumulation=3)))
    fp32 = dict(m.savings(sdxl, dataclasses.replace(s, mixed_precision="no")))
    assert "bf16 weights + bf16 autocast" in fp32 and "bf16 weights" not in fp32  # the trainer needs both
    assert not {"fused backward", "bf16 weights"} & set(
        dict(m.savings(sdxl, dataclasses.replace(s, optimizer="Prodigy")))
    )


def test_plan_setup_reads_the_new_params() -> None:
    from loraforge.planning.memory_plan import setup_from_params
    from stages.finetune_params import Params

    ft = Params(model={}, fused_backward=True, weights_dtype="bfloat16", mixed_precision="bf16")
    s = setup_from_params(ft, "sdxl", (1024, 1024))
    assert s.fused_backward and s.weights_dtype == "bfloat16" and s.held_bytes == 2 and s.per_parameter
    assert not setup_from_params(Params(model={}), "sdxl", (1024, 1024)).per_parameter
    assert ParamStats.from_shapes([(3, 3), (10,)]).largest == 10
