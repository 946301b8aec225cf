"""finetune's training options (issue #4): each one trains the tiny SD1.5 model a few steps for
real with the option on and checks its effect. Data (ingest..latents) is prepared once per module;
`finetune.run` is then called directly with varied params into fresh output folders."""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from loraforge.pipeline.runner import Paths, StageEnv, run_stage
from loraforge.store.items import ItemStore
from loraforge.training import captions as cap
from loraforge.training import ema as ema_mod
from loraforge.training import checkpoints, data, losses, optimizers, resume, schedules, settings, step
from stages import finetune
from tests.helpers import make_project, set_params

SUBSET = 6
BASE = {
    "model": {"base": "builtin:tiny-sd15", "device": "cpu"},
    "epochs": 1,
    "batch_size": 2,
    "lr": 3e-4,
    "save_dtype": "float32",
    "train_text_encoder": True,
}


class Recorder:
    """A publisher that keeps what it is sent."""

    def __init__(self) -> None:
        self.tables: list[tuple[str, list[dict[str, Any]]]] = []
        self.progress_values: list[float] = []

    def table(self, key: str, rows: list[dict[str, Any]], description: str = "") -> None:
        self.tables.append((key, [dict(r) for r in rows]))

    def markdown(self, key: str, text: str, description: str = "") -> None:
        pass

    def progress(self, fraction: float, description: str = "") -> None:
        self.progress_values.append(fraction)


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """Tiny SD1.5 project with latents and captions prepared."""
    root = make_project(tmp_path_factory.mktemp("ft") / "p", git=False)
    set_params(root, {"model": {"base": "builtin:tiny-sd15"}})
    for stage in ("ingest", "upscale", "caption", "latents"):
        run_stage(root, stage)
    # a 6-latent subset keeps every run to a few steps (the full demo has 19 examples per epoch)
    small = root / "data" / "latents-small"
    small.mkdir()
    rows = (root / "data" / "latents" / "manifest.jsonl").read_text().splitlines()[:SUBSET]
    for row in rows:
        name = json.loads(row)["file"]
        (small / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(root / "data" / "latents" / name, small / name)
    (small / "manifest.jsonl").write_text("\n".join(rows) + "\n")
    shutil.copy(root / "data" / "latents" / "buckets.json", small / "buckets.json")  # the grid reg images use
    return root


def train(
    project: Path, out: Path, publish: Any = None, latents: Path | None = None, **overrides: Any
) -> tuple[dict[str, Any], Path]:
    """Run finetune with BASE + overrides into `out` (emptied first, as the runner does), on
    `latents` (default: the 6-latent subset)."""
    shutil.rmtree(out, ignore_errors=True)
    params = finetune.Params(**{**BASE, **overrides})
    inputs = Paths(latents=latents or project / "data" / "latents-small", captions=project / "data" / "captions")
    outputs = Paths(checkpoints=out / "checkpoints", loss=out / "loss")
    outputs.checkpoints.mkdir(parents=True)
    env = StageEnv(
        store=ItemStore(project / ".loraforge" / "store"), state_dir=project / ".loraforge", show_progress=False
    )
    if publish is not None:
        env.publish = publish
    return finetune.run(params, inputs, outputs, env), out


def weights(out: Path, epoch: int = 1, component: str = "unet", sub: str = "") -> dict[str, torch.Tensor]:
    return load_file(str(out / "checkpoints" / f"epoch-{epoch:04d}" / sub / f"{component}.safetensors"))


def tsv(path: Path) -> list[dict[str, str]]:
    head, *rows = path.read_text().splitlines()
    return [dict(zip(head.split("\t"), r.split("\t"))) for r in rows]


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def baseline(project, tmp_path_factory) -> Path:
    """One epoch of plain AdamW: what the options are compared against."""
    return train(project, tmp_path_factory.mktemp("baseline"))[1]


def subset(project: Path) -> list[dict[str, Any]]:
    return data.load_examples(project / "data" / "latents-small", project / "data" / "captions", 1)


def first_step_loss(project: Path, settings: losses.LossSettings, half: bool = False) -> float:
    """The loss of a run's first step (seed 42), recomputed here from the base model: the first
    batch of epoch 1 with its captions as written, the noise of step 0's generator, the loss
    settings; under fp16 autocast with `half` (the text encoder outside it, as in the loop)."""
    from loraforge.models.conditioning import encode_sd15
    from loraforge.models.loading import load_noise_scheduler, load_text_encoders, load_unet, resolve_model
    from loraforge.pipeline.params import ModelParams

    cpu = torch.device("cpu")
    info = resolve_model(ModelParams(base="builtin:tiny-sd15"), project / ".loraforge")
    batch = data.epoch_batches(subset(project), BASE["batch_size"], 42, 1)[0]
    latents = data.load_latents(batch, info.scaling_factor)  # (B, 4, h, w)
    ((tokenizer, encoder),) = load_text_encoders(info, cpu)
    cond = {"hidden": encode_sd15(tokenizer, encoder, [e["caption"] for e in batch])}
    gen = torch.Generator().manual_seed(42 * 1_000_003)  # (seed, step 0)
    with torch.autocast("cpu", dtype=torch.float16, enabled=half):
        loss = losses.diffusion_loss(load_unet(info, cpu), load_noise_scheduler(info), latents, cond, gen, settings)
    return loss.item()


# ---------------------------------------------------------------- 10: divergence guard


def test_a_nan_loss_stops_at_once_naming_step_epoch_and_causes_and_saves_nothing_for_its_epoch(
    project, tmp_path, monkeypatch
):
    per_epoch = data.plan(subset(project), BASE["batch_size"], 2, 1, 1, 42)["steps_per_epoch"]
    real, calls, poison_at = finetune.diffusion_loss, {"n": 0}, per_epoch + 2  # the second step of epoch 2

    def poisoned(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] == poison_at else loss

    monkeypatch.setattr(finetune, "diffusion_loss", poisoned)  # the loop's loss, looked up in the stage module
    message = (
        rf"^finetune: loss is nan at step {per_epoch + 1} \(epoch 2\); training stopped, "
        r"nothing saved for this epoch\. Likely causes: `finetune.lr` = 0.0003 too high for `AdamW` \(the 001 guide"
    )
    with pytest.raises(FloatingPointError, match=message):
        train(project, tmp_path, epochs=2)
    assert calls["n"] == poison_at  # stopped at once, not at the end of the epoch
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["epoch-0001"]  # nothing of epoch 2
    assert not (tmp_path / "loss").exists()  # no tables of a run that did not finish


def test_guard_names_fp16_and_the_half_vae_and_never_saves_nan_weights(tmp_path):
    with pytest.raises(FloatingPointError, match="no half VAE"):
        step.check_finite(torch.tensor(float("nan")), 7, 2, step.divergence_causes(3e-4, "AdamW", "fp16", {}))
    step.check_finite(torch.tensor(1.0), 7, 2, [])  # finite: no error
    with pytest.raises(FloatingPointError, match="non-finite weights"):
        checkpoints.save_checkpoint(
            tmp_path / "e", {"unet": {"w": torch.tensor([1.0, float("nan")])}}, torch.float32, {}
        )
    assert not (tmp_path / "e" / "unet.safetensors").exists()


def test_a_nan_latent_is_refused_naming_its_file_and_the_vae(tmp_path):
    from safetensors.torch import save_file

    save_file({"latent": torch.tensor([[[float("nan")]]] * 4)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(FloatingPointError, match=r"x\.safetensors has NaN.*no half VAE"):
        data.load_latents([{"path": tmp_path / "x.safetensors"}], 0.18)


# ---------------------------------------------------------------- 1: optimizers


@pytest.mark.parametrize(
    "name, args, lr",
    [
        ("Lion", {}, 3e-5),
        (
            "Prodigy",
            {
                "decouple": True,
                "weight_decay": 0.01,
                "d_coef": 0.8,
                "use_bias_correction": True,
                "safeguard_warmup": True,
                "betas": [0.9, 0.99],
            },
            1.0,
        ),
        ("DAdaptAdam", {"decouple": True}, 1.0),
        ("Adafactor", {}, 3e-4),
        ("AdamW8bit", {}, 3e-4),
        ("torch.optim.SGD", {"momentum": 0.9}, 1e-2),
    ],
)
def test_each_optimizer_trains_and_moves_the_weights(project, tmp_path, baseline, name, args, lr):
    shutil.rmtree(project / ".loraforge" / "resume", ignore_errors=True)
    summary, out = train(project, tmp_path, optimizer=name, optimizer_args=args, lr=lr, resume="auto")
    step_losses = [float(r["loss"]) for r in tsv(out / "loss" / "steps.tsv")]
    assert summary["optimizer"] == name
    assert summary["loss_last_epoch"] == pytest.approx(sum(step_losses) / len(step_losses), rel=1e-5)
    from loraforge.models.loading import resolve_model, weight_files
    from loraforge.pipeline.params import ModelParams

    base = load_file(
        str(weight_files(resolve_model(ModelParams(base="builtin:tiny-sd15"), project / ".loraforge"), "unet")[0])
    )
    tuned = weights(out)
    assert all(torch.isfinite(t).all() for t in tuned.values())
    assert max_diff(tuned, base) > 0 and max_diff(tuned, weights(baseline)) > 0
    if name in ("Prodigy", "DAdaptAdam"):  # the LR applied is d·lr (lr = 1), d as the optimizer left it
        applied = [float(r["unet"]) for r in tsv(out / "loss" / "lr.tsv")]
        (state,) = (project / ".loraforge" / "resume").glob("*/state-epoch-0001")
        groups = torch.load(state / "training.pt", weights_only=True)["optimizer"]["param_groups"]
        assert applied[-1] == pytest.approx(groups[0]["d"] * groups[0]["lr"], rel=1e-5) and groups[0]["lr"] == 1.0
        assert applied[-1] != pytest.approx(lr)  # d moved from where it started, lr = 1 is not what applies


def test_optimizer_errors_name_the_parameter():
    with pytest.raises(ValueError, match="`finetune.optimizer` = 'Adamw'"):
        optimizers.optimizer_class("Adamw", "cpu")
    with pytest.raises(ValueError, match="needs the `nosuchpkg` package"):
        optimizers.optimizer_class("nosuchpkg.Opt", "cpu")
    p = [torch.nn.Parameter(torch.zeros(2))]
    with pytest.raises(ValueError, match="`finetune.optimizer_args`"):
        optimizers.make_optimizer("AdamW", [{"params": p, "lr": 1.0}], {"d_coef": 0.8}, 0.0, "cpu")
    assert optimizers.make_optimizer("Lion", [{"params": p, "lr": 1.0}], {"betas": [0.9, 0.99]}, 0.0, "cpu").defaults[
        "betas"
    ] == (0.9, 0.99)


def test_bitsandbytes_imports_quietly_under_loraforge():
    import subprocess
    import sys

    bare = subprocess.run(
        [sys.executable, "-c", "import bitsandbytes"], capture_output=True, text=True, check=True
    ).stderr
    if "gemm_4bit" not in bare:
        pytest.skip("this bitsandbytes does not warn at import: nothing to silence")
    code = "import loraforge, peft, bitsandbytes.optim"  # peft imports bitsandbytes when installed
    err = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stderr
    assert "gemm_4bit" not in err, err


def test_adamw8bit_keeps_its_moments_in_8_bits_and_tracks_adamw():
    torch.manual_seed(0)
    weight = torch.randn(64, 128)  # bitsandbytes quantises tensors of 4096+ elements
    target = torch.randn(64, 128)
    params = {name: torch.nn.Parameter(weight.clone()) for name in ("AdamW", "AdamW8bit")}
    opts = {
        name: optimizers.make_optimizer(name, [{"params": [p], "lr": 1e-2}], {}, 0.0, "cpu")
        for name, p in params.items()
    }
    for _ in range(5):
        for name, p in params.items():
            opts[name].zero_grad()
            (p - target).pow(2).mean().backward()
            opts[name].step()
    state = opts["AdamW8bit"].state[params["AdamW8bit"]]
    assert state["state1"].dtype == state["state2"].dtype == torch.uint8  # 1 byte per moment, not 4
    moved = (params["AdamW"] - weight).abs().mean()
    assert moved > 0 and (params["AdamW8bit"] - params["AdamW"]).abs().mean() < 0.1 * moved  # same steps, quantised


# ---------------------------------------------------------------- 2: schedules, per-encoder LR, logged LR


@pytest.mark.parametrize(
    "name, at_half",
    [
        ("constant_with_warmup", 1.0),
        ("linear", 0.5),
        ("cosine", 0.5),
        ("cosine_with_restarts", 1.0),
        ("polynomial", 0.5),
    ],
)
def test_schedules_warm_up_then_follow_their_curve(name, at_half):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = schedules.make_lr_schedule(name, opt, warmup=10, total=110, num_cycles=2, power=1.0)
    lrs = []
    for _ in range(110):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == 0 and lrs[5] == pytest.approx(0.5) and lrs[10] == pytest.approx(1.0)
    assert lrs[60] == pytest.approx(at_half, abs=1e-3)  # halfway through the decay (restarts: start of cycle 2)


def test_warmup_as_ratio_and_constant_without_warmup():
    assert schedules.warmup_steps(0, 0.05, 200) == 10 and schedules.warmup_steps(7, 0.0, 200) == 7
    with pytest.raises(ValueError, match="lr_warmup_steps` or `finetune.lr_warmup_ratio"):
        schedules.warmup_steps(7, 0.05, 200)
    with pytest.raises(ValueError, match="`finetune.lr_scheduler: constant` has no warmup"):
        finetune.check(finetune.Params(model={}, lr_warmup_steps=3), torch.device("cpu"), None)


def test_applied_lr_per_encoder_is_logged_and_lr_zero_freezes_the_encoder(project, tmp_path):
    summary, out = train(project, tmp_path / "a", lr_scheduler="linear", lr_warmup_ratio=0.3, text_encoder_lr=1e-4)
    rows = tsv(out / "loss" / "lr.tsv")
    unet, te = [float(r["unet"]) for r in rows], [float(r["text_encoder"]) for r in rows]
    total = summary["plan"]["optimizer_steps"]  # one per step here (no accumulation)
    warmup = round(0.3 * total)

    def linear(k: int) -> float:  # diffusers' linear schedule with warmup, at optimizer step k
        return k / warmup if k < warmup else max(0.0, (total - k) / (total - warmup))

    assert len(rows) == total and warmup > 1
    assert unet == pytest.approx([3e-4 * linear(k) for k in range(total)], rel=1e-5)  # warm up, then decay
    assert te == pytest.approx([1e-4 * linear(k) for k in range(total)], rel=1e-5)  # its own LR, the same curve
    assert [r["lr"] for r in tsv(out / "loss" / "steps.tsv")] == [r["unet"] for r in rows]
    assert (out / "checkpoints" / "epoch-0001" / "text_encoder.safetensors").is_file()

    summary, out = train(project, tmp_path / "b", text_encoder_lr=0.0)
    assert summary["trained"] == ["unet"] and "text_encoder" not in tsv(out / "loss" / "lr.tsv")[0]
    assert not (out / "checkpoints" / "epoch-0001" / "text_encoder.safetensors").exists()


def test_component_lrs_for_two_encoders():
    lrs = settings.component_lrs
    assert lrs(2, 1e-5, "AdamW", True, 2e-6, 0.0) == {"unet": 1e-5, "text_encoder": 2e-6}
    assert lrs(2, 1e-5, "AdamW", True, None, None) == {"unet": 1e-5, "text_encoder": 2.5e-6, "text_encoder_2": 2.5e-6}
    assert lrs(2, 1.0, "Prodigy", True, None, 0.0) == {"unet": 1.0, "text_encoder": 1.0}
    assert lrs(2, 1e-5, "AdamW", False, 2e-6, None) == {"unet": 1e-5}  # the encoders train only when asked
    with pytest.raises(ValueError, match="`finetune.text_encoder_lr` = 0.5: Prodigy needs every LR equal"):
        lrs(1, 1.0, "Prodigy", True, 0.5, None)


# ---------------------------------------------------------------- 3: losses and noise


def scheduler(prediction_type: str = "epsilon") -> Any:
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type)


def test_min_snr_and_debiased_weights_match_the_formulas_at_known_timesteps():
    sch = scheduler()
    t = torch.tensor([10, 300, 999])
    a = sch.alphas_cumprod[t]
    snr = a / (1 - a)
    assert torch.allclose(losses.snr(sch, t), snr)
    assert snr[0] > 5 > snr[2]  # the weights clip at t=10, not at t=999
    eps = losses.loss_weights(snr, False, 5.0, False)
    v = losses.loss_weights(snr, True, 5.0, False)
    assert torch.allclose(eps, torch.minimum(snr, torch.tensor(5.0)) / snr)
    assert eps[0] == pytest.approx(5 / snr[0].item()) and eps[2] == pytest.approx(1.0)
    assert torch.allclose(v, torch.minimum(snr, torch.tensor(5.0)) / (snr + 1))
    assert torch.allclose(losses.loss_weights(snr, False, 0.0, True), 1 / snr.clamp(max=1000).sqrt())


def test_noise_shapes_offset_pyramid_and_huber():
    lat = torch.randn(2, 4, 16, 16)
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    off = losses.offset_noise(lat, g(), 0.1, False, 0.0)
    assert off.shape == (2, 4, 1, 1)
    strong = losses.offset_noise(lat + 10, g(), 0.1, False, 1.0)
    assert (strong.abs() > off.abs()).all()  # adaptive scale grows with |latent mean|
    rand = losses.offset_noise(lat, g(), 0.1, True, 0.0)
    assert rand.abs().sum() < off.abs().sum()  # strength × U[0,1)
    base = torch.randn(2, 4, 16, 16, generator=g())
    pyr = losses.pyramid_noise(base.clone(), g(), 6, 0.3)
    assert pyr.std().item() == pytest.approx(1.0, abs=1e-4) and not torch.allclose(pyr, base / base.std())
    pred, target = torch.zeros(1, 1, 1, 2), torch.tensor([[[[0.01, 3.0]]]])
    huber = losses.per_sample_loss(pred, target, "huber", 0.1)
    assert huber.item() < losses.per_sample_loss(pred, target, "l2", 0.1).item()  # linear, not quadratic, in outliers


def test_input_perturbation_and_v_target_reach_the_unet():
    seen: dict[str, torch.Tensor] = {}

    class Unet:
        def __call__(self, noisy: torch.Tensor, t: torch.Tensor, **kw: Any) -> Any:
            seen["noisy"], seen["t"] = noisy, t
            return type("Out", (), {"sample": torch.zeros_like(noisy)})()

    lat = torch.randn(2, 4, 8, 8)
    sch = scheduler()
    cond = {"hidden": torch.zeros(2, 77, 8)}

    def run(**kw: Any) -> tuple[torch.Tensor, torch.Tensor]:
        loss = losses.diffusion_loss(
            Unet(), sch, lat, cond, torch.Generator().manual_seed(3), losses.LossSettings(**kw)
        )
        return loss, seen["noisy"]

    plain_loss, plain_noisy = run()
    ip_loss, ip_noisy = run(ip_noise_gamma=0.1)
    assert not torch.allclose(ip_noisy, plain_noisy) and ip_loss == pytest.approx(plain_loss.item())  # same target
    v_loss, _ = run(v_parameterization=True)
    assert v_loss.item() != pytest.approx(plain_loss.item())


def test_training_with_every_loss_option_on(project, tmp_path, baseline):
    options = {
        "min_snr_gamma": 5.0,
        "loss_type": "huber",
        "noise_offset": 0.05,
        "noise_offset_random_strength": True,
        "adaptive_noise_scale": 0.01,
        "multires_noise_iterations": 6,
        "multires_noise_discount": 0.3,
        "ip_noise_gamma": 0.1,
        "debiased_estimation": True,
    }
    summary, out = train(project, tmp_path, **options)
    base_loss = [float(r["loss"]) for r in tsv(baseline / "loss" / "steps.tsv")]
    loss = [float(r["loss"]) for r in tsv(out / "loss" / "steps.tsv")]
    assert len(loss) == len(base_loss) and all(map(math.isfinite, loss))
    # the first step (base weights) recomputed outside the stage: every option reaches the loss
    assert loss[0] == pytest.approx(first_step_loss(project, losses.LossSettings(**options)), rel=1e-5)
    assert base_loss[0] == pytest.approx(first_step_loss(project, losses.LossSettings()), rel=1e-5)
    assert loss[0] != pytest.approx(base_loss[0], rel=1e-3)


# ---------------------------------------------------------------- 5: EMA


def test_ema_follows_the_decay_formula():
    lin = torch.nn.Linear(2, 1)
    w0 = lin.weight.detach().clone()
    ema = ema_mod.EMA({"m": lin}, 0.9)
    with torch.no_grad():
        lin.weight.add_(1.0)
    ema.update()
    assert torch.allclose(ema.state_dict("m")["weight"], 0.9 * w0 + 0.1 * (w0 + 1))
    assert torch.equal(lin.weight, w0 + 1)  # the raw weights are untouched
    with pytest.raises(ValueError, match="`finetune.ema_decay`"):
        ema_mod.EMA({"m": lin}, 1.0)


def test_ema_weights_are_saved_beside_each_checkpoint_and_lag_the_raw_ones(project, tmp_path, baseline):
    summary, out = train(project, tmp_path, ema_decay=0.5)
    raw, avg = weights(out), weights(out, sub="ema")
    assert summary["ema"] and (out / "checkpoints" / "epoch-0001" / "ema" / "text_encoder.safetensors").is_file()
    assert max_diff(raw, weights(baseline)) == 0  # EMA does not change training
    from loraforge.models.loading import resolve_model, weight_files
    from loraforge.pipeline.params import ModelParams

    base = load_file(
        str(weight_files(resolve_model(ModelParams(base="builtin:tiny-sd15"), project / ".loraforge"), "unet")[0])
    )
    moved = [k for k in raw if not torch.equal(raw[k], base[k])]
    assert moved and max_diff({k: avg[k] for k in moved}, {k: raw[k] for k in moved}) > 0
    dist = lambda a: sum((a[k] - base[k]).norm().item() for k in moved)  # noqa: E731
    assert dist(avg) < dist(raw)  # the average lags behind, towards where training started


# ---------------------------------------------------------------- 9: exact resume


def test_killed_and_resumed_run_matches_the_uninterrupted_one(project, tmp_path, monkeypatch):
    opts = {
        "epochs": 2,
        "resume": "auto",
        "ema_decay": 0.9,
        "lr_scheduler": "cosine",
        "gradient_accumulation": 2,
        "optimizer": "Prodigy",
        "lr": 1.0,
        "caption_dropout_rate": 0.3,
        "seed": 7,
    }
    state = project / ".loraforge" / "resume"
    shutil.rmtree(state, ignore_errors=True)
    straight, out = train(project, tmp_path / "straight", **opts)
    want = {k: v.clone() for k, v in weights(out, 2).items()}
    want_ema = weights(out, 2, sub="ema")
    want_steps = tsv(out / "loss" / "steps.tsv")
    shutil.rmtree(state)

    real = resume.save_state

    def killed(folder: Path, epoch: int, *args: Any) -> Path:
        real(folder, epoch, *args)  # the state is on disk, then the process "dies"
        raise KeyboardInterrupt("killed after epoch 1")

    monkeypatch.setattr(resume, "save_state", killed)
    with pytest.raises(KeyboardInterrupt):
        train(project, tmp_path / "killed", **opts)
    monkeypatch.setattr(resume, "save_state", real)
    assert [p.name for p in state.glob("*/state-*")] == ["state-epoch-0001"]

    again, out = train(project, tmp_path / "killed", **opts)  # outputs emptied again, as DVC does
    assert again["plan"] == straight["plan"] and again["epochs_saved"] == ["epoch-0001", "epoch-0002"]
    assert tsv(out / "loss" / "steps.tsv") == want_steps
    got = weights(out, 2)
    assert max_diff(got, want) < 1e-6 and max_diff(weights(out, 2, sub="ema"), want_ema) < 1e-6
    assert (out / "checkpoints" / "epoch-0001" / "unet.safetensors").is_file()  # the epoch before the kill is back


def test_resume_needs_the_same_params_and_is_off_by_default(project, tmp_path, capsys):
    shutil.rmtree(project / ".loraforge" / "resume", ignore_errors=True)
    train(project, tmp_path / "a")
    assert not (project / ".loraforge" / "resume").exists()  # `off`: no state written
    train(project, tmp_path / "b", resume="auto")
    assert "resumed" not in capsys.readouterr().out
    train(project, tmp_path / "c", resume="auto")
    assert "resumed from state-epoch-0001" in capsys.readouterr().out
    train(project, tmp_path / "d", resume="auto", lr=1e-4)  # other params: a fresh run
    assert "resumed" not in capsys.readouterr().out
    assert len(list((project / ".loraforge" / "resume").iterdir())) == 2


def test_save_last_n_epochs_keeps_the_newest_checkpoints_and_a_resumed_run_keeps_them_so(project, tmp_path, capsys):
    shutil.rmtree(project / ".loraforge" / "resume", ignore_errors=True)
    report, out = train(project, tmp_path / "a", epochs=4, save_last_n_epochs=2, resume="auto")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["epoch-0003", "epoch-0004"]
    assert report["epochs_saved"] == ["epoch-0003", "epoch-0004"]
    kept = next((project / ".loraforge" / "resume").iterdir()) / "checkpoints"
    assert sorted(p.name for p in kept.iterdir()) == ["epoch-0003", "epoch-0004"]  # gone from the resume folder too
    capsys.readouterr()
    _, out = train(project, tmp_path / "b", epochs=4, save_last_n_epochs=2, resume="auto")  # all done: restored
    assert "resumed from state-epoch-0004" in capsys.readouterr().out
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["epoch-0003", "epoch-0004"]
    shutil.rmtree(project / ".loraforge" / "resume", ignore_errors=True)


# ---------------------------------------------------------------- 8: fp16 with loss scaling


def test_fp16_scales_the_loss_unscales_before_clipping_and_skips_an_overflowing_step():
    from loraforge.training.precision import MixedPrecision

    torch.manual_seed(0)
    layer = torch.nn.Linear(8, 4)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    amp = MixedPrecision("fp16", torch.device("cpu"), None, init_scale=1024.0, growth_interval=2)
    x = torch.randn(3, 8)
    with amp.autocast():
        out = layer(x)
    assert out.dtype == torch.float16  # the forward really runs in half precision
    loss = out.float().pow(2).mean()
    assert amp.scale(loss).item() == pytest.approx(loss.item() * 1024, rel=1e-6)
    amp.scale(loss).backward()
    scaled = layer.weight.grad.clone()
    amp.unscale(optimizer)
    assert torch.allclose(layer.weight.grad, scaled / 1024)  # true gradients for clipping
    before = layer.weight.detach().clone()
    assert amp.step(optimizer) and not torch.equal(layer.weight, before) and amp.loss_scale == 1024
    optimizer.zero_grad()

    # an overflowing step: skipped, weights untouched, the scale halves
    with amp.autocast():
        big = layer(x).float().sum() * float("inf")
    amp.scale(big).backward()
    before = layer.weight.detach().clone()
    assert not amp.step(optimizer)
    assert torch.equal(layer.weight, before) and amp.loss_scale == 512 and amp.skipped == 1
    optimizer.zero_grad()

    for _ in range(2):  # `growth_interval` clean steps: the scale doubles
        with amp.autocast():
            amp.scale(layer(x).float().pow(2).mean()).backward()
        assert amp.step(optimizer)
        optimizer.zero_grad()
    assert amp.loss_scale == 1024

    plain = MixedPrecision("no", torch.device("cpu"), None)
    assert plain.scaler is None and plain.loss_scale is None and plain.scale(loss) is loss


def test_fp16_training_runs_the_unet_in_half_precision_and_reports_the_loss_scale(
    project, tmp_path, baseline, monkeypatch
):
    seen: list[torch.dtype] = []
    real = finetune.diffusion_loss

    def recording(unet: Any, *args: Any) -> torch.Tensor:
        hook = unet.conv_in.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
        try:
            return real(unet, *args)
        finally:
            hook.remove()

    monkeypatch.setattr(finetune, "diffusion_loss", recording)
    summary, out = train(project, tmp_path, mixed_precision="fp16", resume="auto")
    assert seen and set(seen) == {torch.float16}
    # torch's initial scale 2**16, halved once per skipped (overflowing) step, not grown within 2000 steps
    assert summary["mixed_precision"] == "fp16" and summary["loss_scale"] == 2.0 ** (16 - summary["skipped_steps"])
    assert summary["skipped_steps"] < summary["plan"]["optimizer_steps"]
    tuned, ref = weights(out), weights(baseline)
    assert all(torch.isfinite(t).all() and t.dtype == torch.float32 for t in tuned.values())  # fp32 master weights
    assert max_diff(tuned, ref) > 0  # half-precision activations: not bit-for-bit the fp32 training
    fp32_losses = [float(r["loss"]) for r in tsv(baseline / "loss" / "steps.tsv")]
    fp16_losses = [float(r["loss"]) for r in tsv(out / "loss" / "steps.tsv")]
    assert fp16_losses[0] == pytest.approx(first_step_loss(project, losses.LossSettings(), half=True), rel=1e-5)
    assert fp16_losses != fp32_losses and fp16_losses == pytest.approx(fp32_losses, rel=2e-2)
    state = max(
        (project / ".loraforge" / "resume").glob("*/state-epoch-0001"), key=lambda p: p.stat().st_mtime
    )  # this run's
    saved = torch.load(state / "training.pt", weights_only=True)
    assert saved["scaler"]["scale"] == summary["loss_scale"]  # the scaler resumes too


# ---------------------------------------------------------------- 4: captions at train time


def test_keep_tokens_separator_keeps_the_tags_around_the_flexible_middle_and_never_trains_it():
    plain, keep = cap.split_at_separator("ohwx, style ||| red, circle, flat ||| masterpiece", "|||")
    assert plain == "ohwx, style, red, circle, flat, masterpiece" and keep == (2, 1)
    assert cap.split_at_separator("ohwx, red", "|||") == ("ohwx, red", None)
    assert cap.split_at_separator("a ||| b", "") == ("a ||| b", None)  # no separator set: as written
    s = cap.CaptionSettings(shuffle=True, keep_tokens=5)  # the separator decides, not keep_tokens
    outs = {cap.train_caption(plain, s, random.Random(i), 1, keep) for i in range(30)}
    assert len(outs) > 2 and all(o.startswith("ohwx, style, ") and o.endswith(", masterpiece") for o in outs)
    assert all(sorted(o.split(", ")) == sorted(plain.split(", ")) for o in outs)
    assert cap.train_caption(plain, cap.CaptionSettings(), random.Random(0), 1, keep) == plain  # no "|||" trains


def test_examples_read_separated_captions_as_plain_text_with_their_kept_tags(tmp_path):
    latents, captions = tmp_path / "latents", tmp_path / "captions"
    latents.mkdir()
    captions.mkdir()
    (latents / "manifest.jsonl").write_text(json.dumps({"id": "a", "file": "a.safetensors", "bucket": [64, 64]}) + "\n")
    (captions / "manifest.jsonl").write_text(json.dumps({"id": "a", "caption": "ohwx ||| red, circle"}) + "\n")
    [example] = data.load_examples(latents, captions, 1, "|||")
    assert example["caption"] == "ohwx, red, circle" and example["keep"] == (1, 0)
    assert data.batch_captions([example], cap.CaptionSettings(shuffle=True), 0, 3, 1)[0].startswith("ohwx, ")


def test_caption_shuffle_keeps_the_first_tokens_and_drops_by_rate():
    s = cap.CaptionSettings(shuffle=True, keep_tokens=1)
    text = "lfxstyle, red, circle, yellow, background, flat"
    outs = {cap.train_caption(text, s, random.Random(i), 1) for i in range(20)}
    assert len(outs) > 5 and all(
        o.startswith("lfxstyle, ") and sorted(o.split(", ")) == sorted(text.split(", ")) for o in outs
    )
    assert cap.train_caption(text, s, random.Random(3), 1) == cap.train_caption(text, s, random.Random(3), 1)
    drop = cap.CaptionSettings(tag_dropout_rate=0.5, keep_tokens=1)
    kept = [cap.train_caption(text, drop, random.Random(i), 1).split(", ") for i in range(200)]
    # each of the 5 other tags survives its own draw ≥ 0.5, in order: the same draws, replayed here
    survivors = [[t for t in text.split(", ")[1:] if rng.random() >= 0.5] for rng in map(random.Random, range(200))]
    assert kept == [["lfxstyle", *rest] for rest in survivors] and any(len(rest) < 5 for rest in survivors)
    rate = cap.CaptionSettings(dropout_rate=0.25)
    dropped = [cap.train_caption(text, rate, random.Random(i), 1) == "" for i in range(200)]
    assert dropped == [random.Random(i).random() < 0.25 for i in range(200)] and any(dropped) and not all(dropped)
    every = cap.CaptionSettings(dropout_every_n_epochs=2)
    assert (
        cap.train_caption(text, every, random.Random(0), 2) == ""
        and cap.train_caption(text, every, random.Random(0), 3) == text
    )
    assert every.randomised and not cap.CaptionSettings(keep_tokens=1).randomised


def test_training_sees_the_augmented_captions(project, tmp_path, monkeypatch):
    seen: list[str] = []
    real = finetune.conditioning

    def spy(arch: str, encode: Any, batch: Any, captions: list[str], device: Any) -> Any:
        seen.extend(captions)
        return real(arch, encode, batch, captions, device)

    monkeypatch.setattr(finetune, "conditioning", spy)
    train(project, tmp_path, caption_dropout_every_n_epochs=2, epochs=2)
    per_epoch = len(seen) // 2
    assert all(c for c in seen[:per_epoch]) and not any(seen[per_epoch:])  # epoch 2 trains without captions


def test_frozen_encoders_read_text_outputs_from_the_item_store(project, tmp_path):
    first, out1 = train(project, tmp_path / "a", train_text_encoder=False, seed=11)
    again, out2 = train(project, tmp_path / "b", train_text_encoder=False, seed=11)
    assert first["text_cache"]["hits"] + first["text_cache"]["misses"] == first["plan"]["examples_per_epoch"]
    assert again["text_cache"] == {"hits": first["plan"]["examples_per_epoch"], "misses": 0}
    assert tsv(out1 / "loss" / "steps.tsv") == tsv(out2 / "loss" / "steps.tsv")  # cached = live outputs
    by_id = {
        r["id"]: r["caption"]
        for r in map(json.loads, (project / "data" / "captions" / "manifest.jsonl").read_text().splitlines())
    }
    used = {
        by_id[json.loads(r)["id"]]
        for r in (project / "data" / "latents-small" / "manifest.jsonl").read_text().splitlines()
    }
    assert len(list((project / ".loraforge" / "store" / "text-embedding").rglob("*.safetensors"))) == len(used)
    trained, _ = train(project, tmp_path / "c")  # encoders trained: no cache
    shuffled, _ = train(project, tmp_path / "d", train_text_encoder=False, shuffle_caption=True)  # randomised: no cache
    assert trained["text_cache"] is None and shuffled["text_cache"] is None


# ---------------------------------------------------------------- 12: progress


def test_progress_and_the_epoch_loss_table_are_published_as_training_goes(project, tmp_path):
    rec = Recorder()
    summary, _ = train(project, tmp_path, publish=rec, epochs=2)
    assert rec.progress_values[-1] == pytest.approx(1.0) and rec.progress_values == sorted(rec.progress_values)
    assert len(rec.progress_values) == summary["plan"]["steps"]
    loss_tables = [rows for key, rows in rec.tables if key == "epoch-loss"]
    assert [len(rows) for rows in loss_tables] == [1, 2]  # updated after every epoch


# ---------------------------------------------------------------- 7: direct LoRA


def test_direct_lora_trains_only_adapters_and_saves_a_kohya_file(project, tmp_path):
    from loraforge.lora.format import load_lora

    summary, out = train(
        project,
        tmp_path,
        mode="lora",
        network_dim=4,
        network_alpha=2.0,
        conv_dim=2,
        conv_alpha=1.0,
        network_dropout=0.1,
        rank_dropout=0.1,
        module_dropout=0.1,
        lr=1e-3,
        ema_decay=0.5,
    )
    folder = out / "checkpoints" / "epoch-0001"
    assert sorted(p.name for p in folder.iterdir()) == ["ema", "lora.safetensors", "meta.json"]  # no full weights
    tensors, meta = load_lora(folder / "lora.safetensors")
    assert any(k.startswith("lora_unet_") for k in tensors) and any(k.startswith("lora_te_") for k in tensors)
    ranks = {k: t.shape[0] for k, t in tensors.items() if k.endswith(".lora_down.weight")}
    conv = [k for k, t in tensors.items() if k.endswith(".lora_down.weight") and t.dim() == 4 and t.shape[-1] == 3]
    assert conv and all(ranks[k] == 2 for k in conv) and {ranks[k] for k in ranks if k not in conv} == {4}
    assert all(float(tensors[k]) == 2.0 for k in tensors if k.endswith(".alpha"))  # one alpha per file
    assert any(
        tensors[k].abs().max() > 0 for k in tensors if k.endswith(".lora_up.weight")
    )  # up started at 0 and moved
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "2.0" and meta["ss_epoch"] == "1"
    ema_tensors, _ = load_lora(folder / "ema" / "lora.safetensors")
    assert ema_tensors.keys() == tensors.keys() and any(not torch.equal(ema_tensors[k], tensors[k]) for k in tensors)


def test_direct_lora_loads_in_diffusers_and_changes_the_output(project, tmp_path):
    from loraforge.models.loading import load_pipeline, resolve_model
    from loraforge.pipeline.params import ModelParams

    _, out = train(project, tmp_path, mode="lora", network_dim=4, network_alpha=4.0, lr=1e-2, train_text_encoder=False)
    pipe = load_pipeline(
        resolve_model(ModelParams(base="builtin:tiny-sd15"), project / ".loraforge"), torch.device("cpu")
    )

    def image() -> torch.Tensor:
        return torch.from_numpy(
            pipe(
                "lfxstyle",
                num_inference_steps=2,
                width=64,
                height=64,
                output_type="np",
                generator=torch.Generator().manual_seed(0),
            ).images
        )

    base = image()
    pipe.load_lora_weights(str(out / "checkpoints" / "epoch-0001"), weight_name="lora.safetensors")
    assert (image() - base).abs().max() > 1e-4


def test_scale_weight_norms_caps_every_update(project, tmp_path):
    from loraforge.training import lora_net

    lin = torch.nn.Linear(8, 8)
    net = lora_net.LoRANetwork(torch.nn.Sequential(lin), {"0": "lora_unet_x"}, 4, 4.0, 0, 1.0)
    torch.nn.init.normal_(net.layers["lora_unet_x"].up.weight, std=10.0)
    x = torch.randn(3, 8)
    assert not torch.allclose(lin(x), torch.nn.functional.linear(x, lin.weight, lin.bias))  # forward is patched
    scaled, mean = lora_net.scale_weight_norms([net], 1.0)
    assert scaled == 1 and mean > 1 and net.layers["lora_unet_x"].delta().norm().item() == pytest.approx(1.0, rel=1e-4)
    summary, out = train(
        project, tmp_path, mode="lora", lr=5e-2, scale_weight_norms=0.05, network_dim=4, network_alpha=4.0
    )
    rows = tsv(out / "loss" / "steps.tsv")
    assert int(rows[-1]["keys_scaled"]) > 0
    tensors = load_file(str(out / "checkpoints" / "epoch-0001" / "lora.safetensors"))
    for k in (k for k in tensors if k.endswith(".lora_down.weight")):
        up = tensors[k.replace("lora_down", "lora_up")].flatten(1)
        assert (up @ tensors[k].flatten(1)).norm().item() <= 0.05 * 1.001  # alpha/rank = 1
    with pytest.raises(ValueError, match="`finetune.scale_weight_norms` applies to `finetune.mode: lora` only"):
        finetune.check(finetune.Params(model={}, scale_weight_norms=1.0), torch.device("cpu"), None)


# ---------------------------------------------------------------- 8: speed


def test_prefetch_yields_every_batch_in_order_and_reraises_errors():
    loaded: list[int] = []

    def load(batch: list[int]) -> int:
        loaded.append(batch[0])
        if batch[0] == 3:
            raise FloatingPointError("bad latent 3")
        return batch[0] * 10

    assert list(data.prefetch([[1], [2]], load)) == [([1], 10), ([2], 20)]
    gen = data.prefetch([[1], [3]], load)
    assert next(gen) == ([1], 10)
    with pytest.raises(FloatingPointError, match="bad latent 3"):
        next(gen)


def test_every_attention_module_of_the_trained_unet_runs_torch_sdpa(project, tmp_path, monkeypatch):
    """loraforge selects no attention processor itself: diffusers gives every `Attention` module
    `AttnProcessor2_0` (torch SDPA: fused, no (tokens × tokens) matrix kept) on torch 2. What this
    checks is that the UNet as loraforge trains it (loaded, made trainable, prepared by accelerate)
    still has it on every attention module, and that every training forward runs through each."""
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    real_loss, real_call, calls = finetune.diffusion_loss, AttnProcessor2_0.__call__, {"n": 0}
    seen: list[tuple[int, set[type], int]] = []

    def counting(self: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        calls["n"] += 1
        return real_call(self, *args, **kwargs)

    def spy(unet: Any, *args: Any) -> torch.Tensor:
        attention = [m for m in unet.modules() if isinstance(m, Attention)]
        before = calls["n"]
        loss = real_loss(unet, *args)
        seen.append((len(attention), {type(m.processor) for m in attention}, calls["n"] - before))
        return loss

    monkeypatch.setattr(AttnProcessor2_0, "__call__", counting)
    monkeypatch.setattr(finetune, "diffusion_loss", spy)
    summary, _ = train(project, tmp_path, epochs=1)
    assert len(seen) == summary["plan"]["steps"]
    assert all(n > 0 and kinds == {AttnProcessor2_0} and ran == n for n, kinds, ran in seen), seen


def test_gradient_checkpointing_recomputes_activations_and_trains_the_same_weights(
    project, tmp_path, baseline, monkeypatch
):
    import torch.utils.checkpoint as ckpt

    real, calls = ckpt.checkpoint, {"n": 0}

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(ckpt, "checkpoint", counting)
    _, out = train(project, tmp_path, gradient_checkpointing=True)
    assert calls["n"] > 0  # blocks ran under activation checkpointing
    assert max_diff(weights(out), weights(baseline)) < 1e-5  # memory traded for compute, same maths


def test_channels_last_trains_with_the_unet_in_channels_last(project, tmp_path, baseline, monkeypatch):
    seen: list[bool] = []
    real = finetune.diffusion_loss

    def spy(unet: Any, scheduler: Any, latents: torch.Tensor, *args: Any) -> torch.Tensor:
        conv = unet.conv_in.weight
        seen.append(conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous())
        return real(unet, scheduler, latents, *args)

    monkeypatch.setattr(finetune, "diffusion_loss", spy)
    _, out = train(project, tmp_path, channels_last=True)
    assert seen and all(seen)
    assert max_diff(weights(out), weights(baseline)) < 1e-4  # same training, another memory layout


# ---------------------------------------------------------------- 6: prior preservation


def test_class_images_are_generated_once_cached_and_mixed_in_by_weight(project, tmp_path, baseline, monkeypatch):
    from loraforge.training import prior

    assert (
        prior.class_image_count(None, 5, True) == 500 and prior.class_image_count(None, 5, False) == 1000
    )  # 002 guide
    opts = {"class_prompt": "a shape", "num_class_images": 2, "class_inference_steps": 2}
    _, out = train(project, tmp_path / "a", prior_loss_weight=1.0, **opts)
    cached = sorted((project / ".loraforge" / "store" / "class-latent").rglob("*.safetensors"))
    assert len(cached) == 2 and load_file(str(cached[0]))["latent"].shape == (4, 16, 16)  # 128 px / 8
    with_prior = [float(r["loss"]) for r in tsv(out / "loss" / "steps.tsv")]
    plain = [float(r["loss"]) for r in tsv(baseline / "loss" / "steps.tsv")]
    assert all(p > q for p, q in zip(with_prior, plain))  # instance + class loss, first step on equal weights

    import loraforge.models.loading as models

    monkeypatch.setattr(models, "load_pipeline", lambda *a, **k: pytest.fail("class images must come from the cache"))
    _, out = train(project, tmp_path / "b", prior_loss_weight=0.0, **opts)
    assert [float(r["loss"]) for r in tsv(out / "loss" / "steps.tsv")] == plain  # weight 0: the instance loss alone


def test_reg_images_are_encoded_once_through_the_store_and_mixed_in_by_weight(project, tmp_path, baseline):
    from PIL import Image

    from loraforge.training import prior

    folder = project / "reg" / "1_plain_shape"  # a kohya-style name: caption "plain shape"
    folder.mkdir(parents=True)
    for i, size in enumerate([(128, 128), (96, 160), (200, 120)]):  # three buckets
        Image.new("RGB", size, (40 * i, 200 - 50 * i, 90)).save(folder / f"r{i}.png")
    (folder / "r1.txt").write_text("a tall shape\n")
    assert [prior.reg_caption(folder / f"r{i}.png") for i in range(3)] == ["plain shape", "a tall shape", "plain shape"]

    summary, out = train(project, tmp_path / "a", prior_loss_weight=1.0, reg_images="reg/1_plain_shape")
    assert summary["class_images"] == {"count": 3, "encoded": 3}
    assert len(list((project / ".loraforge" / "store" / "reg-latent").rglob("*.safetensors"))) == 3
    with_prior = [float(r["loss"]) for r in tsv(out / "loss" / "steps.tsv")]
    plain = [float(r["loss"]) for r in tsv(baseline / "loss" / "steps.tsv")]
    assert with_prior[0] > plain[0]  # instance + class loss, on equal weights

    summary, out = train(project, tmp_path / "b", prior_loss_weight=0.0, reg_images="reg/1_plain_shape")
    assert summary["class_images"] == {"count": 3, "encoded": 0}  # all from the store
    assert [float(r["loss"]) for r in tsv(out / "loss" / "steps.tsv")] == plain  # weight 0: the instance loss alone


def test_reg_images_errors_name_the_keys(project, tmp_path):
    with pytest.raises(ValueError, match="`finetune.class_prompt`.*`finetune.reg_images`.*not both"):
        finetune.Params(**BASE, class_prompt="a shape", reg_images="reg")
    with pytest.raises(ValueError, match="`finetune.reg_images` folder .*nowhere does not exist"):
        train(project, tmp_path, reg_images="nowhere")


# ---------------------------------------------------------------- scale: torch.compile


def test_compiled_unet_trains_and_saves_plain_key_names(project, tmp_path):
    if "inductor" not in torch._dynamo.list_backends():
        pytest.skip(f"torch._dynamo has no inductor backend (available: {torch._dynamo.list_backends()})")
    # two latents of one bucket, two epochs: two steps on one shape, so inductor compiles once
    small = project / "data" / "latents-small"
    rows = [
        json.dumps({**json.loads(r), "repeats": 1})
        for r in (small / "manifest.jsonl").read_text().splitlines()
        if json.loads(r)["bucket"] == [96, 160]
    ][:2]
    one_bucket = tmp_path / "latents"
    one_bucket.mkdir()
    for row in rows:
        shutil.copy(small / json.loads(row)["file"], one_bucket / json.loads(row)["file"])
    (one_bucket / "manifest.jsonl").write_text("\n".join(rows) + "\n")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    summary, out = train(
        project, tmp_path / "out", latents=one_bucket, compile=True, train_text_encoder=False, epochs=2
    )
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # the UNet really ran compiled
    losses = [float(r["loss"]) for r in tsv(out / "loss" / "steps.tsv")]
    assert len(losses) == summary["plan"]["steps"] == 2 and all(map(math.isfinite, losses))
    keys = list(weights(out, epoch=2))
    assert "conv_in.weight" in keys and not any("_orig_mod" in k for k in keys)
    torch._dynamo.reset()


# ---------------------------------------------------------------- scale: data parallel processes


@pytest.mark.parametrize(
    "mode, saved, launch",
    [("full", "unet.safetensors", "num_processes"), ("lora", "lora.safetensors", "accelerate_config")],
)
def test_two_processes_share_the_batches_and_save_once(project, tmp_path, mode, saved, launch):
    recorder = Recorder()
    if launch == "num_processes":
        how: dict[str, Any] = {"num_processes": 2}
    else:  # a file as `accelerate config` writes it, relative to the project
        (project / "accelerate.yaml").write_text(
            "compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_CPU\n"
            "mixed_precision: 'no'\nnum_machines: 1\nnum_processes: 2\nuse_cpu: true\n"
        )
        how = {"accelerate_config": "accelerate.yaml"}
    summary, out = train(project, tmp_path, recorder, epochs=2, train_text_encoder=False, mode=mode, **how)
    one = data.plan(
        data.load_examples(project / "data" / "latents-small", project / "data" / "captions", 1),
        batch_size=BASE["batch_size"],
        epochs=2,
        gradient_accumulation=1,
        processes=1,
        seed=42,
    )
    assert summary["processes"] == 2
    assert summary["plan"]["steps_per_epoch"] == -(-one["steps_per_epoch"] // 2)  # each process: half the batches
    assert summary["optimizer_steps_taken"] == summary["plan"]["optimizer_steps"]
    losses = [float(r["loss"]) for r in tsv(out / "loss" / "steps.tsv")]
    assert len(losses) == summary["plan"]["steps"] and all(map(math.isfinite, losses))
    files = sorted(p.relative_to(out / "checkpoints").as_posix() for p in (out / "checkpoints").rglob("*.safetensors"))
    assert files == [f"epoch-0001/{saved}", f"epoch-0002/{saved}"]  # the first process alone saves
    # the first process's live progress and tables reach the parent's publisher
    assert len(recorder.progress_values) == summary["plan"]["steps"] and recorder.progress_values[-1] == 1.0
    assert recorder.progress_values == sorted(recorder.progress_values)
    epoch_tables = [rows for key, rows in recorder.tables if key == "epoch-loss"]
    assert [len(rows) for rows in epoch_tables] == [1, 2] and "plan" in [key for key, _ in recorder.tables]


def test_an_accelerate_config_sets_the_launch_and_refuses_what_is_not_supported(tmp_path):
    from loraforge.errors import InputError, MissingInput
    from loraforge.training.accelerate_config import LaunchConfig, launch_config, read_accelerate_config

    def config(text: str) -> Path:
        path = tmp_path / "acc.yaml"
        path.write_text(text)
        return path

    got = read_accelerate_config(
        config(
            "distributed_type: MULTI_GPU\nnum_processes: 4\ngpu_ids: 0,1,2,3\nmain_process_port: 29511\n"
            "mixed_precision: bf16\n"
        ),
        1,
        "bf16",
    )
    assert got == LaunchConfig(processes=4, port=29511, gpu_ids="0,1,2,3")
    assert read_accelerate_config(config("num_processes: 2\ngpu_ids: all\n"), 2, "no") == LaunchConfig(processes=2)
    # two machines of 2 GPUs: num_processes counts both (as in accelerate); the rank comes from the file or the CLI
    two = "distributed_type: MULTI_GPU\nnum_machines: 2\nnum_processes: 4\nmain_process_ip: 10.0.0.1\n"
    two += "main_process_port: 29500\nmachine_rank: 0\n"
    first = read_accelerate_config(config(two), 1, "no")
    assert first == LaunchConfig(processes=2, port=29500, machines=2, machine_rank=0, main_ip="10.0.0.1")
    second = read_accelerate_config(config(two), 4, "no", machine_rank=1)
    assert (second.machine_rank, second.first_rank, second.world, second.processes) == (1, 2, 4, 2)
    fsdp = read_accelerate_config(config("distributed_type: FSDP\nnum_processes: 2\n"), 2, "no")
    assert fsdp == LaunchConfig(processes=2, fsdp=True, reshard_after_forward=True)
    refused = {
        "distributed_type: DEEPSPEED\n": r"`distributed_type: DEEPSPEED` is not supported: DeepSpeed needs CUDA",
        "distributed_type: TPU\n": r"`distributed_type: TPU` is not supported; use one of NO, MULTI_CPU, MULTI_GPU",
        "num_machines: 2\nnum_processes: 2\nmain_process_port: 29500\n": r"`main_process_ip` must be set",
        "num_machines: 2\nnum_processes: 2\nmain_process_ip: 10.0.0.1\n": r"`main_process_port` must be set",
        "num_machines: 2\nnum_processes: 2\nmachine_rank: 2\n": r"`machine_rank: 2` must be from 0 to below `num_mach",
        "num_machines: 2\nnum_processes: 3\n": r"`num_processes: 3` \(all machines together\) must divide evenly",
        "num_machines: 2\nnum_processes: 2\nmachine_rank: 1\nmain_process_ip: h\nmain_process_port: 1\n": (
            r"`machine_rank: 1`: run that machine with `loraforge stage finetune --machine-rank 1` \(not `dvc repro`\)"
        ),
        "distributed_type: FSDP\nnum_processes: 1\nnum_machines: 1\n": r"FSDP` needs `num_processes` of 2 or more",
        "distributed_type: FSDP\nnum_machines: 1\nnum_processes: 2\nfsdp_config:\n  fsdp_version: 1\n": r"FSDP2 only",
        "distributed_type: FSDP\nnum_machines: 1\nnum_processes: 2\nfsdp_config: {fsdp_offload_params: true}\n": (
            r"`fsdp_config.fsdp_offload_params: true` is not supported"
        ),
        "num_processes: two\n": r"`num_processes: two` must be a whole number",
        "num_processes: 0\n": r"`num_processes: 0` must be at least 1",
        "main_process_port: 70000\nnum_processes: 2\n": r"`main_process_port: 70000` must be a TCP port",
        "mixed_precision: fp16\n": r"differs from `finetune.mixed_precision: no`",
        "num_processes: 3\n": r"differs from `finetune.num_processes: 2`",
        "- a list\n": r"expected a mapping",
    }
    for text, message in refused.items():
        with pytest.raises(InputError, match=rf"finetune.accelerate_config.*acc\.yaml.*{message}"):
            read_accelerate_config(config(text), 1 if "num_machines" in text else 2, "no")
    with pytest.raises(MissingInput, match=r"`finetune.accelerate_config` \(.*missing.yaml\): no such file"):
        read_accelerate_config(tmp_path / "missing.yaml", 1, "no")
    with pytest.raises(InputError, match=r"--machine-rank 1 needs a multi-machine `finetune.accelerate_config`"):
        launch_config(None, 1, "no", tmp_path, machine_rank=1)


def stage_process(project: Path, *args: str) -> subprocess.Popen:
    """`loraforge stage finetune ARGS` in the project, as a user runs it on one machine."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    command = [sys.executable, "-m", "loraforge", "stage", "finetune", *args]
    return subprocess.Popen(command, cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["MULTI_CPU", "FSDP"])
def test_two_machines_train_as_one_group_and_only_machine_0_writes_the_outputs(project, tmp_path, kind):
    """Two "machines" on one host: two stage processes (machine ranks 0 and 1, one process each)
    meet at 127.0.0.1 over gloo; both end with the weights machine 0 saved, which equal a
    one-machine DDP run of 2 processes (the same global batch). With FSDP the UNet is sharded
    across the two machines."""
    from loraforge.training.checkpoints import states_hash
    from loraforge.training.launch import free_port

    settings = {"epochs": 1, "batch_size": 2, "save_dtype": "float32", "train_text_encoder": False}
    (project / "two-machines.yaml").write_text(
        f"compute_environment: LOCAL_MACHINE\ndistributed_type: {kind}\nmixed_precision: 'no'\nuse_cpu: true\n"
        "num_machines: 2\nnum_processes: 2\nmachine_rank: 0\nmain_process_ip: 127.0.0.1\n"
        f"main_process_port: {free_port()}\n"
    )
    set_params(project, {"model": {"base": "builtin:tiny-sd15", "device": "cpu"}})
    set_params(project, {"finetune": {**settings, "accelerate_config": "two-machines.yaml", "save_every_n_epochs": 1}})
    machines = [stage_process(project), stage_process(project, "--machine-rank", "1")]
    try:
        logs = [m.communicate(timeout=600)[0] for m in machines]
    finally:
        for m in machines:
            m.kill()
    assert [m.returncode for m in machines] == [0, 0], logs
    first = json.loads((project / "reports" / "finetune.json").read_text())
    second = json.loads((project / ".loraforge" / "machine-1" / "reports" / "finetune.json").read_text())
    saved = {"unet": load_file(str(project / "models" / "checkpoints" / "epoch-0001" / "unet.safetensors"))}
    # each process hashed its own final weights; both equal the checkpoint machine 0 saved
    assert first["processes"] == second["processes"] == 2 and first["fsdp"] == (kind == "FSDP")
    if kind == "FSDP":  # each machine held about half the UNet
        assert first["parameters_held"] == second["parameters_held"]
        assert max(first["parameters_held"]) < 0.6 * sum(first["parameters_held"])
    assert first["weights_xxh3"] == second["weights_xxh3"] == [states_hash(saved, torch.float32)] * 2
    assert first["plan"] == second["plan"] and first["plan"]["steps_per_epoch"] >= 2
    assert not list((project / ".loraforge" / "machine-1" / "models").rglob("*.safetensors"))  # machine 1 saves nothing
    # the same global batch on one machine: 2 local processes
    _, one = train(project, tmp_path / "one", latents=project / "data" / "latents", num_processes=2, **settings)
    print(f"two machines ({kind}) vs one machine (DDP), max |diff|:", max_diff(weights(one), saved["unet"]))
    assert max_diff(weights(one), saved["unet"]) < 1e-5


def test_a_secondary_machine_never_touches_the_pipeline_outputs(project):
    from loraforge.errors import InputError

    set_params(project, {"finetune": {"accelerate_config": None}, "model": {"base": "builtin:tiny-sd15"}})
    sentinel = project / "models" / "checkpoints" / "machine-0.txt"
    sentinel.parent.mkdir(parents=True, exist_ok=True)
    sentinel.write_text("machine 0's output")
    with pytest.raises(InputError, match=r"--machine-rank 1 needs a multi-machine `finetune.accelerate_config`"):
        run_stage(project, "finetune", machine_rank=1)
    assert sentinel.read_text() == "machine 0's output"  # its outputs were prepared under .loraforge/machine-1/
    assert (project / ".loraforge" / "machine-1" / "models" / "checkpoints").is_dir()


@pytest.mark.slow
def test_machines_with_other_params_stop_before_training(project, tmp_path):
    """Machine 1 on its own copy of the project (another filesystem) with another `lr`: both
    machines stop with one line naming the mismatch, and machine 0 saves nothing."""
    from loraforge.training.launch import free_port

    (project / "two-machines.yaml").write_text(
        "distributed_type: MULTI_CPU\nuse_cpu: true\nnum_machines: 2\nnum_processes: 2\n"
        f"main_process_ip: 127.0.0.1\nmain_process_port: {free_port()}\n"
    )
    settings = {"epochs": 1, "train_text_encoder": False, "accelerate_config": "two-machines.yaml"}
    set_params(project, {"model": {"base": "builtin:tiny-sd15", "device": "cpu"}, "finetune": settings})
    other = tmp_path / "machine-1"
    shutil.copytree(project, other, ignore=shutil.ignore_patterns("tmp*"))
    set_params(other, {"finetune": {"lr": 1e-3}})
    machines = [stage_process(project), stage_process(other, "--machine-rank", "1")]
    try:
        logs = [m.communicate(timeout=600)[0] for m in machines]
    finally:
        for m in machines:
            m.kill()
    assert [m.returncode for m in machines] == [2, 2], logs
    for log in logs:
        assert "loraforge: finetune: processes [1] train with other params or data than process 0" in log
    assert not list((project / "models" / "checkpoints").rglob("*.safetensors"))


FSDP_CONFIG = (
    "compute_environment: LOCAL_MACHINE\ndistributed_type: FSDP\nmixed_precision: 'no'\nuse_cpu: true\n"
    "num_machines: 1\nnum_processes: 2\nfsdp_config:\n  fsdp_version: 2\n  fsdp_reshard_after_forward: true\n"
)


def test_fsdp_trains_like_ddp_and_saves_full_checkpoints_that_load(project, tmp_path, baseline):
    """FSDP2 over gloo on 2 CPU processes (UNet and text encoder sharded block by block) against
    DDP on 2 processes: the same weights within float tolerance, saved whole (every key and
    shape of the base model) and loadable as a diffusers UNet."""
    from loraforge.models.loading import load_unet, resolve_model
    from loraforge.pipeline.params import ModelParams
    from loraforge.training.checkpoints import states_hash

    (project / "fsdp.yaml").write_text(FSDP_CONFIG)
    summary, fsdp = train(project, tmp_path / "fsdp", accelerate_config="fsdp.yaml")
    ddp_summary, ddp = train(project, tmp_path / "ddp", num_processes=2)
    total = ddp_summary["parameters_held"][0]  # DDP: each process holds every parameter
    assert summary["fsdp"] and ddp_summary["parameters_held"] == [total, total]
    assert all(held < 0.6 * total for held in summary["parameters_held"])  # FSDP: about half each
    assert sum(summary["parameters_held"]) >= total
    saved = {name: weights(fsdp, component=name) for name in ("unet", "text_encoder")}
    for name, state in saved.items():
        ddp_state = weights(ddp, component=name)
        assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in ddp_state.items()}  # unsharded
        print(f"FSDP vs DDP {name}: max |diff| {max_diff(state, ddp_state):.3g}")
        assert max_diff(state, ddp_state) < 1e-5
        assert max_diff(state, weights(baseline, component=name)) > 1e-4  # a 2-process run, not the 1-process one
    assert summary["weights_xxh3"] == [states_hash(saved, torch.float32)] * 2
    unet = load_unet(resolve_model(ModelParams(base="builtin:tiny-sd15"), project / ".loraforge"), torch.device("cpu"))
    assert not unet.load_state_dict(saved["unet"], strict=True).missing_keys
    base = weights(baseline)  # the files hold the trained weights, not the base model's
    assert any(not torch.equal(v, unet.state_dict()[k]) for k, v in base.items())


def test_fsdp_refuses_what_it_does_not_run_with(project, tmp_path):
    from loraforge.errors import InputError

    (project / "fsdp.yaml").write_text(FSDP_CONFIG)
    for key, value in {"mode": "lora", "ema_decay": 0.99, "resume": "auto", "mixed_precision": "fp16"}.items():
        with pytest.raises(InputError, match=rf"`finetune.{key}: {value}` does not run with `distributed_type: FSDP`"):
            train(project, tmp_path / "out", accelerate_config="fsdp.yaml", **{key: value})


def test_a_nan_loss_in_one_process_stops_every_process_at_once(project, tmp_path):
    from safetensors.torch import save_file

    poisoned = tmp_path / "latents"
    shutil.copytree(project / "data" / "latents-small", poisoned)
    first = json.loads((poisoned / "manifest.jsonl").read_text().splitlines()[0])["file"]
    latent = load_file(str(poisoned / first))["latent"]
    save_file({"latent": torch.full_like(latent, 3e38)}, str(poisoned / first))  # finite, but the UNet overflows on it
    with pytest.raises(FloatingPointError, match=r"loss is (nan|inf) at step \d+ \(epoch 1\).*\(process [01] of 2\)"):
        train(project, tmp_path / "out", latents=poisoned, num_processes=2, train_text_encoder=False)
    assert not list((tmp_path / "out" / "checkpoints").rglob("*.safetensors"))


def test_save_single_file_writes_an_original_layout_model_that_loads_back_equal(project, tmp_path):
    from loraforge.models.loading import load_text_encoders, load_unet, load_vae, resolve_model
    from loraforge.pipeline.params import ModelParams

    _, out = train(project, tmp_path / "run", save_single_file=True, ema_decay=0.5)
    epoch = out / "checkpoints" / "epoch-0001"
    assert (epoch / "ema" / "model.safetensors").is_file()
    builtin = resolve_model(ModelParams(base="builtin:tiny-sd15"), project / ".loraforge")
    info = resolve_model(ModelParams(base=str(epoch / "model.safetensors"), config=str(builtin.path)), tmp_path / "s")
    cpu = torch.device("cpu")
    unet, vae = load_unet(info, cpu).state_dict(), load_vae(info, cpu).state_dict()
    ((_, encoder),) = load_text_encoders(info, cpu)
    for loaded, saved in ((unet, weights(out)), (encoder.state_dict(), weights(out, component="text_encoder"))):
        saved = {k: v for k, v in saved.items() if not k.endswith("position_ids")}
        assert saved.keys() <= loaded.keys() and all(torch.equal(loaded[k], saved[k]) for k in saved)
    base_vae = load_vae(builtin, cpu).state_dict()
    assert all(torch.equal(vae[k], base_vae[k]) for k in base_vae)  # untrained parts come from the base model
    with pytest.raises(ValueError, match="save_single_file"):
        finetune.Params(**{**BASE, "mode": "lora", "save_single_file": True})


# ---------------------------------------------------------------- issue 22: train what a LoRA carries


@pytest.mark.parametrize("layers", ["lora", "lora_conv"])
def test_unet_layers_trains_only_the_weights_a_lora_carries(project, tmp_path, layers):
    from loraforge.models.kohya_names import unet_targets
    from loraforge.models.loading import load_unet, resolve_model
    from loraforge.pipeline.params import ModelParams

    _, out = train(project, tmp_path / "run", unet_layers=layers, train_text_encoder=False)
    info = resolve_model(ModelParams(base="builtin:tiny-sd15"), project / ".loraforge")
    base = load_unet(info, torch.device("cpu")).state_dict()
    tuned = weights(out)
    changed = {k for k, v in tuned.items() if not torch.equal(v, base[k])}
    targets = {f"{m}.weight" for m in unet_targets(base.keys(), conv=layers == "lora_conv")}
    assert changed and changed <= targets, sorted(changed - targets)[:5]  # no bias, norm, embedding
    convs = {k for k in changed if tuned[k].dim() == 4 and tuned[k].shape[-1] == 3}
    assert bool(convs) == (layers == "lora_conv")
    with pytest.raises(ValueError, match="unet_layers"):
        finetune.Params(**{**BASE, "mode": "lora", "unet_layers": "lora"})


# ---------------------------------------------------------------- issue 14: memory savers (mode full)


def test_fused_backward_through_the_stage_trains_what_the_plain_step_trains(project, tmp_path):
    """UNet and text encoder, AdamW with a cosine schedule and weight decay: the fused run's
    checkpoints equal the plain run's (global clipping off in both: fused clips per parameter)."""
    opts = {"max_grad_norm": 0.0, "lr_scheduler": "cosine", "lr_warmup_steps": 1}
    _, plain = train(project, tmp_path / "plain", **opts)
    _, fused = train(project, tmp_path / "fused", fused_backward=True, **opts)
    for component in ("unet", "text_encoder"):
        assert max_diff(weights(fused, component=component), weights(plain, component=component)) < 1e-6
    assert tsv(fused / "loss" / "lr.tsv") == tsv(plain / "loss" / "lr.tsv")  # the schedule drove every part
    with pytest.raises(ValueError, match=r"`finetune.fused_backward: true` .*`finetune.gradient_accumulation: 1`"):
        train(project, tmp_path / "refused", fused_backward=True, gradient_accumulation=2)


def one_batch(project: Path, folder: Path) -> Path:
    """Two latents of one bucket with repeats 1: one step per epoch at batch size 2 (bf16 autocast
    is slow on CPUs)."""
    rows = [json.loads(r) for r in (project / "data" / "latents-small" / "manifest.jsonl").read_text().splitlines()]
    pair = [r for r in rows if r["bucket"] == rows[0]["bucket"]][:2]
    folder.mkdir(parents=True)
    for row in pair:
        shutil.copy(project / "data" / "latents-small" / row["file"], folder / row["file"])
    (folder / "manifest.jsonl").write_text("".join(json.dumps({**r, "repeats": 1}) + "\n" for r in pair))
    shutil.copy(project / "data" / "latents-small" / "buckets.json", folder / "buckets.json")
    return folder


def test_bf16_weights_train_in_bf16_fused_or_not_and_resume_exactly(project, tmp_path, monkeypatch, capsys):
    """bf16 weights, UNet and text encoder: the fused run equals the looped one (the same rounding
    draws per (seed, step, parameter)); killed after epoch 1 and resumed, the per-parameter optimizer
    states, the rounding's step count and the weights come back exactly."""
    seen: list[torch.dtype] = []
    real = finetune.diffusion_loss

    def recording(unet: Any, *args: Any) -> torch.Tensor:
        seen.append(next(unet.parameters()).dtype)
        return real(unet, *args)

    monkeypatch.setattr(finetune, "diffusion_loss", recording)
    latents = one_batch(project, tmp_path / "latents")
    opts = {"weights_dtype": "bfloat16", "mixed_precision": "bf16", "max_grad_norm": 0.0, "ema_decay": 0.9}
    opts.update(epochs=2, resume="auto", latents=latents)
    shutil.rmtree(project / ".loraforge" / "resume", ignore_errors=True)
    summary, looped = train(project, tmp_path / "looped", **opts)
    assert summary["plan"]["optimizer_steps"] == 2 and seen and set(seen) == {torch.bfloat16}
    _, straight = train(project, tmp_path / "straight", fused_backward=True, **opts)
    want = weights(straight, 2)
    assert max_diff(want, weights(looped, 2)) == 0 and max_diff(want, weights(straight, 1)) > 0
    assert max_diff(weights(straight, 2, "text_encoder"), weights(looped, 2, "text_encoder")) == 0
    assert all(v.dtype == torch.float32 for v in weights(straight, 2, sub="ema").values())  # save_dtype float32
    shutil.rmtree(project / ".loraforge" / "resume")
    real_save = resume.save_state

    def killed(folder: Path, epoch: int, *args: Any) -> Path:
        real_save(folder, epoch, *args)
        raise KeyboardInterrupt("killed after epoch 1")

    monkeypatch.setattr(resume, "save_state", killed)
    with pytest.raises(KeyboardInterrupt):
        train(project, tmp_path / "killed", fused_backward=True, **opts)
    monkeypatch.setattr(resume, "save_state", real_save)
    capsys.readouterr()
    train(project, tmp_path / "killed", fused_backward=True, **opts)
    assert "resumed from state-epoch-0001 (step 1)" in capsys.readouterr().out
    assert max_diff(weights(tmp_path / "killed", 2), want) == 0
