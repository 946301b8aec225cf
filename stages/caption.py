"""caption: one caption per image, built around the activation token.

Sources, in the order of `caption.sources`: the sidecar `.txt` ingest carried along, the file
name (the 001 guide keeps captions in file names), the `caption.template`. The trigger replaces a
`{trigger}` placeholder (the 001 guide: put it next to what it should absorb), else goes first or
last. Each caption's token count is checked against CLIP's 75-token window.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, field_validator

from loraforge.images import read_jsonl, write_jsonl
from loraforge.params import ModelParams, section

if TYPE_CHECKING:
    from loraforge.runner import Paths, StageEnv

CaptionSource = Literal["sidecar", "filename", "template"]
# Camera / export names carry no caption ("IMG_0042", "DSC01234", "image (3)", "1234"), nor do
# phone names with date and time ("PXL_20230615_101112345") or copies of any of these ("IMG_0042 (2)").
_CAMERA_NAME = re.compile(
    r"^(img|dsc|dscn|pxl|image|photo|screenshot|frame)?[\s_\-]*\(?\d+\)?(?:[\s_\-]+\(?\d+\)?)*$", re.IGNORECASE
)
_COPY_SUFFIX = re.compile(r"(\s*\(\d+\)|[_\-\s]+\d{1,4})$")  # "cat (2)", "cat_003"


@section
class Params:
    """The `caption` section.

    Attributes:
        trigger: the activation token(s), e.g. `lfxstyle` or a rare + known pair like `femme ewpp`.
        trigger_position: where the trigger goes when a caption has no `{trigger}` placeholder.
        sources: caption sources in order of precedence.
        template: used when no other source applies; `{trigger}` and `{class_token}` are filled in.
        max_tokens: CLIP's window (75 tokens between BOS and EOS); longer captions are reported.
    """

    model: ModelParams
    trigger: str = Field("lfxstyle", min_length=1)
    trigger_position: Literal["first", "last"] = "first"
    sources: tuple[CaptionSource, ...] = ("sidecar", "filename", "template")
    template: str = "{trigger} {class_token}"
    max_tokens: int = Field(75, ge=1)

    @field_validator("sources")
    @classmethod
    def _distinct_sources(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value or len(set(value)) != len(value):
            raise ValueError("must list each of sidecar, filename, template at most once, and at least one")
        return value


def caption_from_filename(source: str) -> str | None:
    """A caption from a file name (`a red circle_02.png` -> `a red circle`), or None for camera names."""
    stem = PurePosixPath(source).stem
    if _CAMERA_NAME.match(stem):
        return None
    text = _COPY_SUFFIX.sub("", stem).replace("_", " ")
    text = re.sub(r"\s+", " ", text).strip()
    return text if re.search(r"[A-Za-z]{2,}", text) else None


def fill_template(template: str, trigger: str, class_token: str) -> str:
    """The template with `{trigger}` and `{class_token}` filled and spacing tidied."""
    text = template.replace("{class_token}", class_token)
    return re.sub(r"\s+", " ", text).strip(" ,")


def insert_trigger(caption: str, trigger: str, position: Literal["first", "last"]) -> str:
    """Place the trigger: at `{trigger}` placeholders, else first or last (unless already there)."""
    if "{trigger}" in caption:
        return re.sub(r"\s+", " ", caption.replace("{trigger}", trigger)).strip()
    if re.search(rf"(^|\W){re.escape(trigger)}($|\W)", caption):
        return caption
    if not caption:
        return trigger
    return f"{trigger}, {caption}" if position == "first" else f"{caption}, {trigger}"


def choose_caption(row: dict[str, Any], params: Params) -> tuple[str, CaptionSource]:
    """The caption text (before trigger insertion) and which source gave it."""
    for source in params.sources:
        if source == "sidecar" and row.get("caption"):
            return row["caption"].strip(), source
        if source == "filename":
            text = caption_from_filename(row["source"])
            if text:
                return text, source
        if source == "template":
            return fill_template(params.template, params.trigger, row.get("class_token") or ""), source
    raise ValueError(
        f"no caption for {row['source']}: none of `caption.sources` {list(params.sources)} applies; add `template`"
    )


def count_tokens(tokenizer: Any, text: str) -> int:
    """Tokens the text takes inside CLIP's window (BOS/EOS excluded)."""
    return len(tokenizer(text, add_special_tokens=False, truncation=False)["input_ids"])


def run(params: Params, inputs: "Paths", outputs: "Paths", env: "StageEnv") -> dict[str, Any]:
    """Write `<id>.txt` and `manifest.jsonl` into `outputs.captions`."""
    from loraforge.models import load_tokenizers, resolve_model

    tokenizer = load_tokenizers(resolve_model(params.model, env.state_dir))[0]
    rows = read_jsonl(inputs.images / "manifest.jsonl")
    out_rows, overflow, by_source = [], [], {s: 0 for s in params.sources}
    for row in rows:
        text, source = choose_caption(row, params)
        caption = insert_trigger(text, params.trigger, params.trigger_position)
        tokens = count_tokens(tokenizer, caption)
        if tokens > params.max_tokens:
            overflow.append({"id": row["id"], "source": row["source"], "tokens": tokens})
            print(f"caption: warning: {row['source']} has {tokens} tokens > {params.max_tokens}; CLIP truncates the rest")
        (outputs.captions / f"{row['id']}.txt").write_text(caption + "\n", encoding="utf-8")
        by_source[source] += 1
        out_rows.append({"id": row["id"], "caption": caption, "caption_source": source, "tokens": tokens, "trigger": params.trigger, "source": row["source"]})
    write_jsonl(outputs.captions / "manifest.jsonl", out_rows)
    env.publish.table("captions", [{k: r[k] for k in ("source", "caption", "caption_source", "tokens")} for r in out_rows], "Captions")
    return {
        "items": len(rows),
        "computed": len(rows),  # captions are cheap string work: always rebuilt, nothing cached
        "reused": 0,
        "trigger": params.trigger,
        "by_source": by_source,
        "max_tokens": params.max_tokens,
        "overflow": overflow,
    }
