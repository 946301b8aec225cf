"""The `caption` section of params.yaml: typed, frozen, validated (no torch, no stage code)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, ValidationInfo, field_validator

from loraforge.pipeline.params import ModelParams, section

CaptionSource = Literal["sidecar", "filename", "template"]
Merge = Literal["keep", "replace", "append"]


@section
class Params:
    """The `caption` section.

    Attributes:
        trigger: the activation token(s), e.g. `lfxstyle` or a rare + known pair like `femme ewpp`.
        trigger_position: where the trigger goes when a caption has no `{trigger}` placeholder;
            `none` leaves such captions as they are (then `require_trigger` catches the ones without it).
        remove_tags: comma-separated tags to prune from every caption, matched case-insensitively
            with `_` = space (the 003 guide prunes `navel` so the concept always shows it).
        require_trigger: stop the run, naming the files, when a final caption lacks the trigger.
        prefix: text put before every caption, with a space (kohya's `caption_prefix`); "" = none.
        suffix: text put after every caption, with a space (kohya's `caption_suffix`); "" = none.
        sources: caption sources in order of precedence.
        template: used when no other source applies; `{trigger}` and `{class_token}` are filled in.
        max_tokens: CLIP's window (75 tokens between BOS and EOS); longer captions are reported.
        captioner: `none`, `blip` (sentence captions) or `wd14` (booru tags from an ONNX tagger).
        captioner_path: local folder or Hugging Face id of the captioner; null = kohya's default
            (`Salesforce/blip-image-captioning-large`, `SmilingWolf/wd-v1-4-convnext-tagger-v2`).
        captioner_revision: hub branch, tag or commit when `captioner_path` is a hub id.
        captioner_batch_size: images per model call.
        merge: `keep` (the captioner stands in for the template), `replace` (its caption wins),
            `append` (its new tags follow the chosen caption).
        blip_decoding: `beam` (beam search) or `nucleus` (top-p sampling, seeded per image).
        blip_num_beams: beams for `beam` (1 = greedy).
        blip_top_p: probability mass kept for `nucleus`.
        blip_min_length: fewest new tokens per caption.
        blip_max_length: most new tokens per caption.
        blip_prompt: text the caption continues (`a picture of`), cut from the result.
        blip_seed: seed for `nucleus`.
        wd14_general_threshold: general tags scoring at least this are kept.
        wd14_character_threshold: character tags scoring at least this are kept.
        wd14_include_rating: put the most likely rating tag (`general`, `sensitive`...) first.
        wd14_undesired_tags: tags the tagger never writes (`_` = space, any case).
        wd14_character_first: character tags before general tags.
        wd14_replace_underscores: `long_hair` -> `long hair` (kaomoji like `^_^` are kept).
    """

    model: ModelParams
    trigger: str = Field("lfxstyle", min_length=1)
    trigger_position: Literal["first", "last", "none"] = "first"
    remove_tags: tuple[str, ...] = ()
    require_trigger: bool = True
    prefix: str = ""
    suffix: str = ""
    sources: tuple[CaptionSource, ...] = ("sidecar", "filename", "template")
    template: str = "{trigger} {class_token}"
    max_tokens: int = Field(75, ge=1)
    captioner: Literal["none", "blip", "wd14"] = "none"
    captioner_path: str | None = None
    captioner_revision: str | None = None
    captioner_batch_size: int = Field(8, ge=1)
    merge: Merge = "keep"
    blip_decoding: Literal["beam", "nucleus"] = "beam"
    blip_num_beams: int = Field(3, ge=1)
    blip_top_p: float = Field(0.9, gt=0, le=1)
    blip_min_length: int = Field(5, ge=0)
    blip_max_length: int = Field(75, ge=1)
    blip_prompt: str = ""
    blip_seed: int = 42
    wd14_general_threshold: float = Field(0.35, ge=0, le=1)
    wd14_character_threshold: float = Field(0.85, ge=0, le=1)
    wd14_include_rating: bool = False
    wd14_undesired_tags: tuple[str, ...] = ()
    wd14_character_first: bool = True
    wd14_replace_underscores: bool = True

    @field_validator("sources")
    @classmethod
    def _distinct_sources(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value or len(set(value)) != len(value):
            raise ValueError("must list each of sidecar, filename, template at most once, and at least one")
        return value

    @field_validator("blip_max_length")
    @classmethod
    def _lengths_in_order(cls, value: int, info: ValidationInfo) -> int:
        low = info.data.get("blip_min_length")
        if low is not None and value < low:
            raise ValueError(f"must be at least `caption.blip_min_length` ({low})")
        return value
