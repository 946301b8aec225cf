"""caption: one caption per image, built around the activation token.

Sources, in the order of `caption.sources`: the sidecar `.txt` ingest carried along, the file
name (the 001 guide keeps captions in file names), the `caption.template`. The trigger replaces a
`{trigger}` placeholder (the 001 guide: put it next to what it should absorb), else goes first
(the 003 guide: activation tag first) or last, or nowhere (`none`: only where the caption asks).
`caption.remove_tags` prunes tags that bleed into the concept (the 003 guide's `navel`); a caption
still without the trigger stops the run (`caption.require_trigger`). The report and a Prefect table
give each tag's count and share of images. Each caption's token count is checked against CLIP's
75-token window.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import PurePosixPath
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
        trigger_position: where the trigger goes when a caption has no `{trigger}` placeholder;
            `none` leaves such captions as they are (then `require_trigger` catches the ones without it).
        remove_tags: comma-separated tags to prune from every caption, matched case-insensitively
            with `_` = space (the 003 guide prunes `navel` so the concept always shows it).
        require_trigger: stop the run, naming the files, when a final caption lacks the trigger.
        sources: caption sources in order of precedence.
        template: used when no other source applies; `{trigger}` and `{class_token}` are filled in.
        max_tokens: CLIP's window (75 tokens between BOS and EOS); longer captions are reported.
    """

    model: ModelParams
    trigger: str = Field("lfxstyle", min_length=1)
    trigger_position: Literal["first", "last", "none"] = "first"
    remove_tags: tuple[str, ...] = ()
    require_trigger: bool = True
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


def insert_trigger(caption: str, trigger: str, position: Literal["first", "last", "none"]) -> str:
    """Place the trigger: at `{trigger}` placeholders, else first or last (unless already there);
    with `none`, only at placeholders."""
    if "{trigger}" in caption:
        return re.sub(r"\s+", " ", caption.replace("{trigger}", trigger)).strip()
    if has_trigger(caption, trigger) or position == "none":
        return caption
    if not caption:
        return trigger
    return f"{trigger}, {caption}" if position == "first" else f"{caption}, {trigger}"


def has_trigger(caption: str, trigger: str) -> bool:
    """Whether `trigger` appears in `caption` as whole words.

    Args:
        caption: the caption.
        trigger: the activation token(s).
    """
    return re.search(rf"(^|\W){re.escape(trigger)}($|\W)", caption) is not None


def normalize_tag(tag: str) -> str:
    """A tag as compared: lower case, `_` as space, single spaces (`Long_Hair ` → `long hair`).

    Args:
        tag: one comma-separated tag.
    """
    return re.sub(r"\s+", " ", tag.replace("_", " ")).strip().lower()


def split_tags(caption: str) -> list[str]:
    """The comma-separated tags of a caption, stripped, empty ones dropped (a sentence caption is one tag).

    Args:
        caption: the caption.
    """
    return [t.strip() for t in caption.split(",") if t.strip()]


def remove_tags(caption: str, tags: tuple[str, ...]) -> str:
    """The caption without the given tags (see `normalize_tag` for matching), rejoined with `, `.

    Args:
        caption: the caption.
        tags: `caption.remove_tags`.
    """
    if not tags:
        return caption
    drop = {normalize_tag(t) for t in tags}
    return ", ".join(t for t in split_tags(caption) if normalize_tag(t) not in drop)


def tag_frequency(captions: list[str]) -> list[dict[str, Any]]:
    """Per tag: in how many captions it appears and that share of the images, most frequent
    first (ties by tag). A tag on nearly every image is a pruning candidate (003 guide).

    Args:
        captions: the final captions, one per image.
    """
    counts: Counter[str] = Counter()
    for caption in captions:
        counts.update({normalize_tag(t) for t in split_tags(caption)})  # once per image
    n = max(1, len(captions))
    return [{"tag": t, "count": c, "share": round(c / n, 4)} for t, c in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]


def check_trigger(rows: list[dict[str, Any]], trigger: str) -> None:
    """Raise naming the images whose caption lacks the trigger (`caption.require_trigger`).

    Args:
        rows: {"source", "caption"} per image.
        trigger: `caption.trigger`.
    """
    missing = [r["source"] for r in rows if not has_trigger(r["caption"], trigger)]
    if missing:
        shown = ", ".join(missing[:10]) + (f" (and {len(missing) - 10} more)" if len(missing) > 10 else "")
        raise ValueError(
            f"{len(missing)} caption(s) lack the trigger {trigger!r} (`caption.require_trigger`): {shown}. "
            "Add `{trigger}` to them, set `caption.trigger_position` to first/last, or `caption.require_trigger: false`"
        )


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
    pruned_trigger = normalize_tag(params.trigger) in {normalize_tag(t) for t in params.remove_tags}
    if pruned_trigger:
        raise ValueError(f"`caption.remove_tags` lists the trigger {params.trigger!r}: it would be pruned from every caption")
    for row in rows:
        text, source = choose_caption(row, params)
        caption = insert_trigger(remove_tags(text, params.remove_tags), params.trigger, params.trigger_position)
        tokens = count_tokens(tokenizer, caption)
        if tokens > params.max_tokens:
            overflow.append({"id": row["id"], "source": row["source"], "tokens": tokens})
            print(f"caption: warning: {row['source']} has {tokens} tokens > {params.max_tokens}; CLIP truncates the rest")
        (outputs.captions / f"{row['id']}.txt").write_text(caption + "\n", encoding="utf-8")
        by_source[source] += 1
        out_rows.append({"id": row["id"], "caption": caption, "caption_source": source, "tokens": tokens, "trigger": params.trigger, "source": row["source"]})
    if params.require_trigger:
        check_trigger(out_rows, params.trigger)
    write_jsonl(outputs.captions / "manifest.jsonl", out_rows)
    tags = tag_frequency([r["caption"] for r in out_rows])
    env.publish.table("tag-frequency", tags, f"Tags across {len(out_rows)} captions (count, share of images)")
    env.publish.table("captions", [{k: r[k] for k in ("source", "caption", "caption_source", "tokens")} for r in out_rows], "Captions")
    return {
        "items": len(rows),
        "computed": len(rows),  # captions are cheap string work: always rebuilt, nothing cached
        "reused": 0,
        "trigger": params.trigger,
        "by_source": by_source,
        "max_tokens": params.max_tokens,
        "overflow": overflow,
        "removed_tags": list(params.remove_tags),
        "tags": tags,
    }
