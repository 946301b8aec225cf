"""Caption augmentation at train time: tag shuffle with `keep_tokens`, tag dropout, caption dropout.

Captions are comma-separated tags; the first `keep_tokens` tags (the activation tag: the 003
guide sets 1) stay in place. Randomness comes from a `random.Random` seeded per (seed, step,
index in batch), so a resumed run draws the same captions.
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


def train_caption(caption: str, s: CaptionSettings, rng: random.Random, epoch: int) -> str:
    """The caption an example is trained with this step.

    Args:
        caption: the example's caption.
        s: caption settings.
        rng: the example's random source for this step.
        epoch: 1-based epoch (for `dropout_every_n_epochs`).
    """
    if s.dropout_every_n_epochs and epoch % s.dropout_every_n_epochs == 0:
        return ""
    if s.dropout_rate and rng.random() < s.dropout_rate:
        return ""
    if not (s.shuffle or s.tag_dropout_rate):
        return caption
    tags = [t.strip() for t in caption.split(",") if t.strip()]
    kept, rest = tags[: s.keep_tokens], tags[s.keep_tokens :]
    if s.tag_dropout_rate:
        rest = [t for t in rest if rng.random() >= s.tag_dropout_rate]
    if s.shuffle:
        rng.shuffle(rest)
    return ", ".join(kept + rest)
