"""Caption augmentation at train time: tag shuffle with `keep_tokens`, tag dropout, caption dropout.

Captions are comma-separated tags; the first `keep_tokens` tags (the activation tag: the 003
guide sets 1) stay in place, or, in a caption written with `finetune.keep_tokens_separator`
(kohya's, e.g. `|||`), the tags before it (and after a second one). Randomness comes from a
`random.Random` seeded per (seed, step, index in batch), so a resumed run draws the same captions.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class CaptionSettings:
    """Attributes:
    shuffle: shuffle the tags after the first `keep_tokens`.
    keep_tokens: leading tags never shuffled or dropped.
    tag_dropout_rate: drop each other tag with this probability.
    dropout_rate: train this share of examples with an empty caption.
    dropout_every_n_epochs: every n-th epoch trains with empty captions only; 0 disables.
    """

    shuffle: bool = False
    keep_tokens: int = 0
    tag_dropout_rate: float = 0.0
    dropout_rate: float = 0.0
    dropout_every_n_epochs: int = 0

    @property
    def randomised(self) -> bool:
        """Whether a caption can differ from its text (then text-encoder outputs cannot be cached)."""
        return bool(self.shuffle or self.tag_dropout_rate or self.dropout_rate or self.dropout_every_n_epochs)


def split_at_separator(caption: str, separator: str) -> tuple[str, tuple[int, int] | None]:
    """kohya's `keep_tokens_separator`: `fixed ||| flex` or `fixed ||| flex ||| fixed suffix`
    as one plain comma-separated caption (the separators gone) and how many tags at its start
    and at its end stay in place; `(caption, None)` when the caption has no separator.

    Args:
        caption: the caption as written.
        separator: `finetune.keep_tokens_separator` ("" = none).
    """
    if not separator or separator not in caption:
        return caption, None
    parts = [[t.strip() for t in part.split(",") if t.strip()] for part in caption.split(separator, 2)]
    fixed, flex, suffix = (parts + [[], []])[:3]
    return ", ".join(fixed + flex + suffix), (len(fixed), len(suffix))


def train_caption(
    caption: str, s: CaptionSettings, rng: random.Random, epoch: int, keep: tuple[int, int] | None = None
) -> str:
    """The caption an example is trained with this step.

    Args:
        caption: the example's caption.
        s: caption settings.
        rng: the example's random source for this step.
        epoch: 1-based epoch (for `dropout_every_n_epochs`).
        keep: tags kept in place at the start and at the end (`split_at_separator`); None = the
            first `keep_tokens`.
    """
    if s.dropout_every_n_epochs and epoch % s.dropout_every_n_epochs == 0:
        return ""
    if s.dropout_rate and rng.random() < s.dropout_rate:
        return ""
    if not (s.shuffle or s.tag_dropout_rate):
        return caption
    tags = [t.strip() for t in caption.split(",") if t.strip()]
    head, tail = keep if keep is not None else (s.keep_tokens, 0)
    kept, rest, end = tags[:head], tags[head : len(tags) - tail], tags[len(tags) - tail :] if tail else []
    if s.tag_dropout_rate:
        rest = [t for t in rest if rng.random() >= s.tag_dropout_rate]
    if s.shuffle:
        rng.shuffle(rest)
    return ", ".join(kept + rest + end)
