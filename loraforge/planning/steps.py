"""The training plan: the guides' step arithmetic, from the ingested dataset and params.

Guides: 000 = RFKTR's guide ("Batch size, epochs, steps, repeats"), 002 = the DreamBooth parameter
research ("Full pass steps", "Resolution", "train_batch_size", "gradient_accumulation_steps",
"Prior Preservation Loss", "Advanced Dreambooth Formula", "lr_scheduler step multipliers").
Each formula is a pure function named after the guide's symbols (FN frames, SPF steps per frame,
RC resolution factor, BS batch size, GA gradient accumulation, ADS incremental steps, F strength).

`build_plan` gathers them into one dict (`plan_000`, `plan_002`); `plan_table` gives the rows for a
Prefect table artifact. `loraforge plan` (in `loraforge.planning.command`) prints it and writes `reports/plan.json`.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

BASE_LR = 1e-5  # 002: the LR at which SPF = 200 (100 with the text encoder)
SPF_AT_BASE_LR = 200  # 002: "For 1e-5, this is 200 steps"
SPF_AT_BASE_LR_TE = 100  # 002: "if you use Text Encoder, then 100"
# 002: "List of F" (training strength), 0.2 (low_end) to 5 (high_end), 1 = medium.
STRENGTH = {
    "low_end": 0.20,
    "ultra_soft": 0.25,
    "very_soft": 0.33,
    "soft": 0.50,
    "medium": 1.00,
    "hard": 2.00,
    "very_hard": 3.00,
    "ultra_hard": 4.00,
    "high_end": 5.00,
}
# 002: "lr_scheduler step multipliers": constant 1, linear/cosine/cosine_with_restarts 2,
# polynomial ~2. constant_with_warmup is not listed: its LR is constant after warmup, so 1.
SCHEDULER_MULTIPLIER = {
    "constant": 1.0,
    "constant_with_warmup": 1.0,
    "linear": 2.0,
    "cosine": 2.0,
    "cosine_with_restarts": 2.0,
    "polynomial": 2.0,
}


def _positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"`{name}` must be > 0, got {value}")


# ---------------------------------------------------------------- 000 guide


def steps(images: int, repeats: float, batch: int, epochs: int) -> float:
    """000: "((image count * repeats) / batch size) * epoch = required steps till finish"
    (10 images, 35 repeats, batch 1, 9 epochs: 3150; batch 4: 787.5, which kohya rounds up).

    Args:
        images: images in the dataset.
        repeats: times each image is seen per epoch (the `N_` of kohya's `N_name` folders).
        batch: batch size.
        epochs: epochs.
    """
    for name, value in (("images", images), ("repeats", repeats), ("batch", batch), ("epochs", epochs)):
        _positive(name, value)
    return images * repeats / batch * epochs


def kohya_steps(images: int, repeats: int, batch: int, epochs: int) -> int:
    """`steps` as kohya runs them: each epoch's last partial batch is still a step.

    Args:
        images: images in the dataset.
        repeats: times each image is seen per epoch.
        batch: batch size.
        epochs: epochs.
    """
    steps(images, repeats, batch, epochs)  # validates
    return math.ceil(images * repeats / batch) * epochs


def repeats_for_steps(target_steps: float, images: int, epochs: int, batch: int = 1) -> int:
    """000, the formula "in a reverse way": repeats = target steps / images / epochs (× batch),
    rounded up ("I advise to always round up": 3500 steps, 10 images, 9 epochs: 350 / 9 = 38.9 → 39).

    Args:
        target_steps: the step count wanted.
        images: images in the dataset.
        epochs: epochs.
        batch: batch size.
    """
    for name, value in (("target_steps", target_steps), ("images", images), ("epochs", epochs), ("batch", batch)):
        _positive(name, value)
    return math.ceil(target_steps * batch / images / epochs - 1e-9)  # slack: 3500·1/10/10 is exactly 35


# ---------------------------------------------------------------- 002 guide


def spf(lr: float, text_encoder: bool) -> float:
    """002: steps per frame, SPF = 200 × (1e-5 / LR), or 100 × (1e-5 / LR) with the text encoder
    (1e-5: 200 / 100; "for 1e-6 it is 2000").

    Args:
        lr: the learning rate.
        text_encoder: whether the text encoder is trained.
    """
    _positive("lr", lr)
    return (SPF_AT_BASE_LR_TE if text_encoder else SPF_AT_BASE_LR) * BASE_LR / lr


def rc(res: int, res_b: int) -> float:
    """002: resolution magnification factor RC = (RES / RES_B)² (768 on a 512 model: 2.25, so
    SPF = 200 × 2.25 = 450 without TE, 225 with).

    Args:
        res: the training resolution.
        res_b: the model's base resolution.
    """
    _positive("res", res)
    _positive("res_b", res_b)
    return (res / res_b) ** 2


def spf_a(spf_value: float, text_encoder: bool) -> int:
    """002: incremental steps per frame: SPF / 1.5 without the text encoder (rounded up, as the
    guide's "for SPF=200, SPF_A=134"), SPF with it.

    Args:
        spf_value: SPF.
        text_encoder: whether the text encoder is trained.
    """
    _positive("spf", spf_value)
    # slack: 1e-5 / 1e-6 × 2.25 comes out as 2250.0000000000005, which must not round up to 2251
    return math.ceil(spf_value - 1e-6) if text_encoder else math.ceil(spf_value / 1.5 - 1e-6)


def ads(spf_a_value: float, bs: int) -> float:
    """002: incremental number of steps, ADS = SPF_A × (BS − 1).

    Args:
        spf_a_value: SPF_A.
        bs: train_batch_size.
    """
    _positive("bs", bs)
    return spf_a_value * (bs - 1)


def max_train_steps(fn: int, spf_value: float, text_encoder: bool, bs: int = 1, ga: int = 1) -> float:
    """002: max_train_steps = (FN × SPF + ADS) / √BS × √GA (BS = GA = 1: FN × SPF). The guide's
    10 frames with TE (SPF 100): BS 1, 2, 5, 10 → 1000, 778, 626, 601; 100 frames: BS 1, 2, 4, 5,
    10 → 10000, 7142, 5150, 4651, 3447.

    Args:
        fn: FN, frames (images) in training.
        spf_value: SPF.
        text_encoder: whether the text encoder is trained (chooses SPF_A).
        bs: train_batch_size.
        ga: gradient_accumulation_steps.
    """
    _positive("fn", fn)
    _positive("ga", ga)
    return (fn * spf_value + ads(spf_a(spf_value, text_encoder), bs)) / math.sqrt(bs) * math.sqrt(ga)


def num_class_images(fn: int, text_encoder: bool) -> int:
    """002, prior preservation: num_class_images = FN × 200, or FN × 100 with the text encoder.

    Args:
        fn: FN, frames in training.
        text_encoder: whether the text encoder is trained.
    """
    _positive("fn", fn)
    return fn * (SPF_AT_BASE_LR_TE if text_encoder else SPF_AT_BASE_LR)


def frames_for_strength(lr: float, f: float) -> float:
    """002: frames for training strength F at a learning rate, (1e-5 / LR) × F
    (LR = 1e-6: medium = 10, hard = 20).

    Args:
        lr: the learning rate.
        f: F, the strength (`STRENGTH`).
    """
    _positive("lr", lr)
    _positive("f", f)
    return BASE_LR / lr * f


def lr_for_frames(fn: int, f: float) -> float:
    """002: LR = 1e-5 / (FN / F) (FN = 125, F = 1: 8e-8).

    Args:
        fn: FN, frames in training.
        f: F, the strength (`STRENGTH`).
    """
    _positive("fn", fn)
    _positive("f", f)
    return BASE_LR / (fn / f)


def scheduler_steps(constant_steps: float, scheduler: str) -> float:
    """002: max_train_steps = s × m, s the constant-LR steps, m the scheduler's multiplier.

    Args:
        constant_steps: s, steps computed for a constant LR.
        scheduler: the lr_scheduler name (`SCHEDULER_MULTIPLIER`).
    """
    if scheduler not in SCHEDULER_MULTIPLIER:
        raise ValueError(f"`lr_scheduler` must be one of {', '.join(SCHEDULER_MULTIPLIER)}, got {scheduler!r}")
    return constant_steps * SCHEDULER_MULTIPLIER[scheduler]


def dynamic_resolution_steps(fn: int, spf_b: float, resolutions: Sequence[int], res_b: int) -> float:
    """002, dynamic resolution: the mean of FN × SPF_B × RC over the trained resolutions
    (512 and 768 on a 512 model, 5 frames: (1000 + 2250) / 2 = 1625).

    Args:
        fn: FN, frames per resolution.
        spf_b: SPF at the base resolution.
        resolutions: the resolutions trained together.
        res_b: the model's base resolution.
    """
    if not resolutions:
        raise ValueError("`resolutions` must list at least one resolution")
    return sum(fn * spf_b * rc(r, res_b) for r in resolutions) / len(resolutions)


# ---------------------------------------------------------------- the plan


def build_plan(
    rows: Sequence[dict[str, Any]],
    *,
    repeats: int,
    batch: int,
    ga: int,
    epochs: int,
    lr: float,
    text_encoder: bool,
    scheduler: str,
    resolution: int,
    base_resolution: int,
    strength: float = STRENGTH["medium"],
    target_steps: int | None = None,
    flip: bool = False,
) -> dict[str, Any]:
    """Every formula above, applied to a dataset and the finetune settings.

    Args:
        rows: the ingest manifest's rows (each with `repeats`, the folder's `N_`).
        repeats: `finetune.repeats`, multiplied with each image's folder repeats.
        batch: `finetune.batch_size`.
        ga: `finetune.gradient_accumulation`.
        epochs: `finetune.epochs`.
        lr: `finetune.lr`.
        text_encoder: `finetune.train_text_encoder`.
        scheduler: `finetune.lr_scheduler`.
        resolution: the training resolution (`latents.resolution`, else the model's native one).
        base_resolution: the model's base resolution.
        strength: F for the LR suggestion (002's medium = 1).
        target_steps: a step count to reach; adds the repeats for it (000's reverse formula).
        flip: `latents.flip`: every image also trains flipped, a second example per repeat.
    """
    fn = len(rows)
    if fn == 0:
        raise ValueError("the dataset holds no images: run ingest first")
    samples = sum(int(r.get("repeats", 1)) * repeats for r in rows) * (2 if flip else 1)  # per epoch
    settings = {
        "repeats": repeats,
        "batch": batch,
        "ga": ga,
        "epochs": epochs,
        "lr": lr,
        "text_encoder": text_encoder,
        "scheduler": scheduler,
        "resolution": resolution,
        "base_resolution": base_resolution,
    }
    dreambooth = plan_002(fn, samples, settings, strength)  # first: it checks lr and resolution first, as ever
    return {
        "images": fn,
        "samples_per_epoch": samples,
        "steps_000": plan_000(fn, samples, batch, ga, epochs, target_steps),
        "dreambooth_002": dreambooth,
        "settings": settings,
    }


def plan_000(fn: int, samples: int, batch: int, ga: int, epochs: int, target_steps: int | None) -> dict[str, Any]:
    """The 000 guide's part of the plan: steps, as kohya counts them, optimizer steps, and the
    repeats for a target step count.

    Args:
        fn: images in the dataset.
        samples: images × repeats, per epoch.
        batch: batch size.
        ga: gradient accumulation steps.
        epochs: epochs.
        target_steps: a step count to reach, or None.
    """
    part: dict[str, Any] = {
        "steps": steps(fn, samples / fn, batch, epochs),  # 000: images × repeats / batch × epochs
        "kohya_steps": kohya_steps(samples, 1, batch, epochs),  # partial last batch of an epoch still steps
        "optimizer_steps": math.ceil(math.ceil(samples / batch) / ga) * epochs,
    }
    if target_steps is not None:
        part["target_steps"] = target_steps
        part["repeats_for_target"] = repeats_for_steps(target_steps, fn, epochs, batch)
    return part


def plan_002(fn: int, samples: int, settings: dict[str, Any], strength: float) -> dict[str, Any]:
    """The 002 guide's part of the plan: SPF at the training resolution, max_train_steps (with the
    scheduler's multiplier), class images, the strength suggestions and the epochs they take.

    Args:
        fn: FN, frames (images) in training.
        samples: images × repeats, per epoch.
        settings: the plan's `settings` (batch, ga, lr, text_encoder, scheduler, resolution, base_resolution).
        strength: F for the LR suggestion.
    """
    lr, te, batch, scheduler = settings["lr"], settings["text_encoder"], settings["batch"], settings["scheduler"]
    spf_base = spf(lr, te)
    factor = rc(settings["resolution"], settings["base_resolution"])
    spf_res = spf_base * factor
    constant = max_train_steps(fn, spf_res, te, batch, settings["ga"])
    return {
        "spf": spf_base,
        "rc": factor,
        "spf_at_resolution": spf_res,
        "spf_a": spf_a(spf_res, te),
        "ads": ads(spf_a(spf_res, te), batch),
        "max_train_steps": round(constant),
        "scheduler_multiplier": SCHEDULER_MULTIPLIER[scheduler],
        "max_train_steps_with_scheduler": round(scheduler_steps(constant, scheduler)),
        "num_class_images": num_class_images(fn, te),
        "strength_f": strength,
        "frames_for_strength": frames_for_strength(lr, strength),
        "lr_for_frames": lr_for_frames(fn, strength),
        "epochs_for_max_train_steps": max(1, round(constant / max(1, math.ceil(samples / batch)))),
    }


def plan_table(plan: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows {section, quantity, value} of a plan, for a table artifact or the terminal.

    Args:
        plan: from `build_plan`.
    """
    rows = [{"section": "dataset", "quantity": k, "value": plan[k]} for k in ("images", "samples_per_epoch")]
    for section in ("steps_000", "dreambooth_002"):
        rows += [{"section": section, "quantity": k, "value": v} for k, v in plan[section].items()]
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """A fixed-width text table of `plan_table` rows.

    Args:
        rows: from `plan_table`.
    """

    def show(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    width = max(len(r["quantity"]) for r in rows)
    lines, section = [], None
    for r in rows:
        if r["section"] != section:
            section = r["section"]
            lines.append(f"[{section}]")
        lines.append(f"  {r['quantity']:<{width}}  {show(r['value'])}")
    return "\n".join(lines)
