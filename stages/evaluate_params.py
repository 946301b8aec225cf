"""The `evaluate` section of params.yaml: typed, frozen, validated (no torch, no stage code)."""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator

from loraforge.pipeline.params import ModelParams, section

SUBJECTS = (
    "a mountain landscape at dawn",
    "a cat sleeping on a sofa",
    "a city street at night in the rain",
    "a bowl of fruit on a wooden table",
    "an old sailing ship on a stormy sea",
    "a portrait of an elderly man",
    "a red sports car in a desert",
    "a cozy library with tall bookshelves",
    "a forest path in autumn",
    "a lighthouse on a cliff",
    "a plate of sushi",
    "a castle in the snow",
)


@section
class Params:
    """The `evaluate` section.

    Attributes:
        prompts: the fixed prompts; `{trigger}` becomes the caption trigger: a simple one, then
            a complex one with context absent from the dataset (004 guide). Likeness is measured
            on all of them and on the random prompts.
        seeds: fixed seeds, the same for every epoch and experiment.
        weights: the LoRA-weight sweep (0 = the base model; the 003 guide checks > 1.2).
        random_prompts: how many random prompts (`random_template` filled from `random_pool`) to render.
        random_template: a random prompt's text: `{subject}` is the drawn subject, `{trigger}` the
            trigger (put it where your captions have it: `caption.trigger_position`).
        random_seed: seeds the draw of the random prompts and their recorded seeds.
        random_pool: subjects the random prompts are drawn from.
        caption_prompts: how many training captions to prompt 1:1 (memorisation check).
        steps: sampler steps.
        guidance_scale: classifier-free guidance.
        size: image side in pixels; null = the model's native resolution.
        negative_prompt: used for every image.
        clip_model: a local CLIP model folder (transformers `CLIPModel` + tokenizer + image
            processor config), relative to the project; null = the pixel-thumbnail fallback,
            and no CLIP score.
        check_weight: the LoRA weight at which overfit signs are judged.
        saturation_limit: largest allowed relative colourfulness rise vs weight 0 at `check_weight`.
        high_freq_limit: largest allowed relative high-frequency rise vs weight 0 at `check_weight`.
        clipped_limit: largest allowed clipped-pixel share rise (absolute) at `check_weight`.
        validation_tolerance: with finetune's validation loss, only epochs whose loss is at most
            this share above the lowest one compete on likeness (0.1 = 10 %); the validation
            loss rises as the LoRA over-fits its images and loses other prompts.
        memorisation_ratio: an epoch memorises when its caption images' nearest-training-image
            distance falls below this fraction of the base model's.
    """

    model: ModelParams
    prompts: tuple[str, ...] = ("{trigger}", "{trigger} riding a bicycle on the moon, detailed")
    seeds: tuple[int, ...] = (1, 2, 3, 4)
    weights: tuple[float, ...] = (0.0, 0.5, 1.0, 1.2, 1.5)
    random_prompts: int = Field(4, ge=0)
    random_template: str = "{trigger}, {subject}"
    random_seed: int = 1234
    random_pool: tuple[str, ...] = SUBJECTS
    caption_prompts: int = Field(4, ge=0)
    steps: int = Field(25, ge=1)
    guidance_scale: float = Field(5.0, ge=0)
    size: int | None = Field(None, ge=64)
    negative_prompt: str = ""
    clip_model: str | None = None
    check_weight: float = Field(1.2, ge=0)
    saturation_limit: float = Field(0.25, ge=0)
    high_freq_limit: float = Field(0.25, ge=0)
    clipped_limit: float = Field(0.05, ge=0)
    memorisation_ratio: float = Field(0.5, gt=0, le=1)
    validation_tolerance: float = Field(0.1, ge=0, le=10)

    @field_validator("prompts", "seeds", "weights", "random_pool")
    @classmethod
    def _not_empty(cls, value: tuple[Any, ...]) -> tuple[Any, ...]:
        if not value:
            raise ValueError("must list at least one value")
        return value

    @field_validator("random_template")
    @classmethod
    def _has_subject(cls, value: str) -> str:
        if "{subject}" not in value:
            raise ValueError(f"must contain {{subject}} (where the drawn subject goes), got {value!r}")
        return value

    @field_validator("weights")
    @classmethod
    def _non_negative(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if any(w < 0 for w in value):
            raise ValueError(f"weights must be ≥ 0, got {list(value)}")
        return value
