"""The `resize` section of params.yaml: typed, frozen, validated (no torch, no stage code)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from loraforge.pipeline.params import section


@section
class Params:
    """The `resize` section.

    Attributes:
        rank: the target rank (`fixed`), or the cap for the dynamic methods; the 001 guide: 16.
        method: `fixed`; `sv_ratio` keeps singular values ≥ max / param; `sv_fro` keeps the
            smallest rank retaining `param` of the Frobenius norm; `sv_cumulative` the smallest
            rank whose singular values sum to `param` of the total.
        param: the dynamic method's target (ratio > 1; fractions in (0, 1]).
        save_dtype: dtype of the saved LoRA.
    """

    rank: int = Field(16, ge=1)
    method: Literal["fixed", "sv_ratio", "sv_fro", "sv_cumulative"] = "fixed"
    param: float | None = Field(None, gt=0)
    save_dtype: Literal["float32", "float16", "bfloat16"] = "float16"

    @model_validator(mode="after")
    def _param_fits_method(self) -> "Params":
        if self.method != "fixed" and self.param is None:
            raise ValueError(f"`resize.param` is required with `resize.method: {self.method}`")
        if self.method in ("sv_fro", "sv_cumulative") and self.param is not None and self.param > 1:
            raise ValueError(f"`resize.param` must be in (0, 1] for `{self.method}`, got {self.param}")
        return self
