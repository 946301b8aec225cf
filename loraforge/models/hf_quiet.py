"""Quiet transformers/diffusers loading: no per-file progress bars, no torchvision notice."""

from __future__ import annotations

from typing import Any


class _NoTorchvisionNotice:
    """Drops transformers' "requires torchvision ... falling back to ...Pil" notice: the PIL
    image processors are what loraforge wants (no torchvision is installed on CPU), and the
    notice's advice to install one would break a CPU torch."""

    def filter(self, record: Any) -> bool:
        return "requires torchvision" not in record.getMessage()


def quiet_hf_loading() -> None:
    """No per-file "Loading weights" bars from transformers/diffusers (the stages draw their own)."""
    import logging

    import diffusers
    import transformers

    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.disable_progress_bar()
    for name in ("transformers.utils.import_utils",):
        logging.getLogger(name).addFilter(_NoTorchvisionNotice())
