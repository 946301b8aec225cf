"""caption: one caption per image, built around the activation token.

Sources, in the order of `caption.sources`: the sidecar `.txt` ingest carried along, the file
name (the 001 guide keeps captions in file names), the `caption.template`. A model captioner
(`caption.captioner`: `blip` sentences or `wd14` booru tags, from a local folder or a Hugging
Face id, see `loraforge.captioning.captioners`) merges in by `caption.merge`: `keep` (it stands in for the
template: sidecar and file-name captions win), `replace` (its caption wins wherever it wrote
one) or `append` (its tags follow the chosen caption, minus tags already there). Its output is
cached per image in the item store, keyed by the image's pixels, the hash of the model's files
and the settings that change the output; WD14 scores are cached, so a new threshold re-selects
tags without running the model. The trigger replaces a
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
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Literal

from PIL import Image

from loraforge.captioning.captioners import normalize_tag
from loraforge.store.fanout import chunked
from loraforge.data.images import read_jsonl, write_jsonl
from loraforge.store.items import Item
from stages.caption_params import CaptionSource, Merge, Params

if TYPE_CHECKING:
    from loraforge.captioning.blip import BlipCaptioner
    from loraforge.captioning.wd14 import Wd14Tagger
    from loraforge.pipeline.runner import Paths, StageEnv
    from loraforge.store.items import ItemStore

# Camera / export names carry no caption ("IMG_0042", "DSC01234", "image (3)", "1234"), nor do
# phone names with date and time ("PXL_20230615_101112345") or copies of any of these ("IMG_0042 (2)").
_CAMERA_NAME = re.compile(
    r"^(img|dsc|dscn|pxl|image|photo|screenshot|frame)?[\s_\-]*\(?\d+\)?(?:[\s_\-]+\(?\d+\)?)*$", re.IGNORECASE
)
_COPY_SUFFIX = re.compile(r"(\s*\(\d+\)|[_\-\s]+\d{1,4})$")  # "cat (2)", "cat_003"


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
    return [
        {"tag": t, "count": c, "share": round(c / n, 4)}
        for t, c in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    ]


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


def base_caption(row: dict[str, Any], params: Params) -> tuple[str, CaptionSource] | None:
    """The caption from `caption.sources` (before trigger insertion) and its source; None if none applies."""
    for source in params.sources:
        if source == "sidecar" and row.get("caption"):
            return row["caption"].strip(), source
        if source == "filename":
            text = caption_from_filename(row["source"])
            if text:
                return text, source
        if source == "template":
            return fill_template(params.template, params.trigger, row.get("class_token") or ""), source
    return None


def choose_caption(row: dict[str, Any], params: Params) -> tuple[str, CaptionSource]:
    """The caption text (before trigger insertion) and which source gave it; raises when none applies."""
    if choice := base_caption(row, params):
        return choice
    raise ValueError(
        f"no caption for {row['source']}: none of `caption.sources` {list(params.sources)} applies; add `template`"
    )


def wants_machine_caption(choice: tuple[str, str] | None, params: Params) -> bool:
    """Whether an image needs the captioner: always for `replace`/`append`; for `keep`, only
    when `caption.sources` gave nothing better than the template.

    Args:
        choice: `base_caption` of the image.
        params: the `caption` section.
    """
    if params.captioner == "none":
        return False
    return params.merge != "keep" or choice is None or choice[1] == "template"


def merge_caption(
    choice: tuple[str, str] | None, generated: str, merge: Merge, captioner: str
) -> tuple[str, str] | None:
    """The caption and its source after merging the captioner's output into `choice`.

    An empty `generated` (no tag above threshold) leaves `choice` as it is. `keep` uses
    `generated` in place of a template caption; `replace` uses it always; `append` adds its tags
    that `choice` lacks (compared as `normalize_tag`) after `choice`, source `<source>+<captioner>`.

    Args:
        choice: `base_caption` of the image (None when no source applies).
        generated: the captioner's caption ("" when it gave nothing or was not asked).
        merge: `caption.merge`.
        captioner: `caption.captioner`, the source name of a machine caption.
    """
    if not generated:
        return choice
    if choice is None or merge == "replace" or (merge == "keep" and choice[1] == "template"):
        return generated, captioner
    if merge == "keep":
        return choice
    text, source = choice
    have = {normalize_tag(t) for t in split_tags(text)}
    extra = [t for t in split_tags(generated) if normalize_tag(t) not in have]
    return ", ".join([text, *extra]), f"{source}+{captioner}"


def make_captioner(params: Params, state_dir: Path) -> tuple[BlipCaptioner | Wd14Tagger, str]:
    """The configured captioner (not loaded yet) and the hash of its model files.

    Args:
        params: the `caption` section (`captioner` is `blip` or `wd14`).
        state_dir: loraforge's private folder; its parent is the project root for relative paths.
    """
    from loraforge.captioning.captioners import locate_model, model_files
    from loraforge.models.weights import files_hash

    kind = params.captioner
    folder = locate_model(kind, params.captioner_path, Path(state_dir).parent, params.captioner_revision)
    identity = files_hash(model_files(kind, folder), folder, state_dir)
    if kind == "blip":
        from loraforge.captioning.blip import BlipCaptioner, BlipSettings

        settings = BlipSettings(
            decoding=params.blip_decoding,
            num_beams=params.blip_num_beams,
            top_p=params.blip_top_p,
            min_length=params.blip_min_length,
            max_length=params.blip_max_length,
            prompt=params.blip_prompt,
            seed=params.blip_seed,
        )
        return BlipCaptioner(folder, settings, params.model.device), identity
    from loraforge.captioning.wd14 import Wd14Settings, Wd14Tagger

    settings = Wd14Settings(
        general_threshold=params.wd14_general_threshold,
        character_threshold=params.wd14_character_threshold,
        include_rating=params.wd14_include_rating,
        undesired_tags=params.wd14_undesired_tags,
        character_first=params.wd14_character_first,
        replace_underscores=params.wd14_replace_underscores,
    )
    return Wd14Tagger(folder, settings, params.model.device), identity


def machine_captions(
    rows: list[dict[str, Any]], params: Params, images: Path, env: "StageEnv"
) -> tuple[dict[str, str], int]:
    """The captioner's caption per image id, and how many images the model ran on.

    Raw outputs are cached in the item store (kind `autocaption-<captioner>`) by image pixels,
    model file hash and the settings that change the raw output; only missing ones are computed.

    Args:
        rows: manifest rows of the images to caption (need `id`, `file`, `pixel_hash`).
        params: the `caption` section.
        images: the folder the rows' `file` paths are relative to.
        env: the stage environment (store, progress).
    """
    captioner, identity = make_captioner(params, env.state_dir)
    kind = f"autocaption-{params.captioner}"
    entries = {
        r["id"]: env.store.item(kind, image=r["pixel_hash"], model=identity, **captioner.identity()) for r in rows
    }
    pending = [
        {"file": r["file"], "key": entries[r["id"]].key} for r in rows if not entries[r["id"]].get(captioner.suffix)
    ]
    # batches fixed before chunking, so where a chunk runs never changes what a batch holds
    batches = chunked(pending, params.captioner_batch_size)
    bar = env.tracker(len(pending), f"captioning with {params.captioner}")
    per_chunk = max(1, env.fan_out.chunk_size // params.captioner_batch_size)  # batches per chunk
    env.fan_out.map(caption_chunk, CaptionJob(captioner, kind, images, env.store), chunked(batches, per_chunk), bar)
    bar.close()
    out = {r["id"]: captioner.caption(entries[r["id"]].path(captioner.suffix).read_bytes()) for r in rows}
    return out, len(pending)


@dataclass(frozen=True)
class CaptionJob:
    """What every chunk of captioning needs; sent once to each worker.

    Attributes:
        captioner: the BLIP captioner or WD14 tagger (its model loads on first use, per process).
        kind: the store kind of its raw outputs.
        images: the folder the items' files are relative to.
        store: the item store the raw outputs go to.
    """

    captioner: Any
    kind: str
    images: Path
    store: "ItemStore"


def caption_chunk(job: CaptionJob, batches: list[list[dict[str, Any]]]) -> int:
    """Run the captioner on each batch of items (`file`, `key`); raw outputs into the store."""
    done = 0
    for batch in batches:
        images = []
        for it in batch:
            with Image.open(job.images / it["file"]) as img:
                images.append(img.copy())  # the captioners convert (BLIP: RGB; WD14: alpha on white)
        for it, raw in zip(batch, job.captioner.run(images)):
            Item(job.store, job.kind, it["key"]).put_bytes(job.captioner.suffix, raw)
        done += len(batch)
    return done


def count_tokens(tokenizer: Any, text: str) -> int:
    """Tokens the text takes inside CLIP's window (BOS/EOS excluded)."""
    return len(tokenizer(text, add_special_tokens=False, truncation=False)["input_ids"])


def check_remove_tags(trigger: str, remove_tags: tuple[str, ...]) -> None:
    """Stop before any work when `caption.remove_tags` would prune the trigger from every caption.

    Args:
        trigger: `caption.trigger`.
        remove_tags: `caption.remove_tags`.
    """
    if normalize_tag(trigger) in {normalize_tag(t) for t in remove_tags}:
        raise ValueError(f"`caption.remove_tags` lists the trigger {trigger!r}: it would be pruned from every caption")


def run(params: Params, inputs: "Paths", outputs: "Paths", env: "StageEnv") -> dict[str, Any]:
    """Write `<id>.txt` and `manifest.jsonl` into `outputs.captions`."""
    from loraforge.models.loading import load_tokenizers, resolve_model

    check_remove_tags(params.trigger, params.remove_tags)
    tokenizer = load_tokenizers(resolve_model(params.model, env.state_dir))[0]
    rows = read_jsonl(inputs.images / "manifest.jsonl")
    choices = {r["id"]: base_caption(r, params) for r in rows}
    wanted = [r for r in rows if wants_machine_caption(choices[r["id"]], params)]
    generated, ran = machine_captions(wanted, params, inputs.images, env) if wanted else ({}, 0)
    out_rows, overflow, by_source = [], [], {s: 0 for s in params.sources}
    for row in rows:
        merged = merge_caption(choices[row["id"]], generated.get(row["id"], ""), params.merge, params.captioner)
        text, source = merged or choose_caption(row, params)  # None: no source applies, choose_caption says so
        framed = " ".join(
            part for part in (params.prefix, remove_tags(text, params.remove_tags), params.suffix) if part
        )
        caption = insert_trigger(framed, params.trigger, params.trigger_position)
        tokens = count_tokens(tokenizer, caption)
        if tokens > params.max_tokens:
            overflow.append({"id": row["id"], "source": row["source"], "tokens": tokens})
            print(
                f"caption: warning: {row['source']} has {tokens} tokens > {params.max_tokens}; CLIP truncates the rest"
            )
        (outputs.captions / f"{row['id']}.txt").write_text(caption + "\n", encoding="utf-8")
        by_source[source] = by_source.get(source, 0) + 1
        out_rows.append(
            {
                "id": row["id"],
                "caption": caption,
                "caption_source": source,
                "tokens": tokens,
                "trigger": params.trigger,
                "source": row["source"],
            }
        )
    if params.require_trigger:
        check_trigger(out_rows, params.trigger)
    write_jsonl(outputs.captions / "manifest.jsonl", out_rows)
    tags = tag_frequency([r["caption"] for r in out_rows])
    env.publish.table("tag-frequency", tags, f"Tags across {len(out_rows)} captions (count, share of images)")
    env.publish.table(
        "captions", [{k: r[k] for k in ("source", "caption", "caption_source", "tokens")} for r in out_rows], "Captions"
    )
    reused = len(wanted) - ran
    return {
        "items": len(rows),
        "computed": len(rows) - reused,  # string work is always redone; only captioner outputs are cached
        "reused": reused,
        "captioner": params.captioner,
        "merge": params.merge,
        "machine_captioned": len(wanted),  # images the captioner was asked about
        "generated": ran,  # of those, images the model ran on (the rest came from the item store)
        "trigger": params.trigger,
        "by_source": by_source,
        "max_tokens": params.max_tokens,
        "overflow": overflow,
        "removed_tags": list(params.remove_tags),
        "tags": tags,
    }
