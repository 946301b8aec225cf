"""The `extract` section of params.yaml: typed, frozen, validated (no torch, no stage code)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from loraforge.pipeline.params import ModelParams, section


@section
class Params:
    """The `extract` section.

    Attributes:
        dim: rank of each extracted layer (capped by the layer's size); the 001 guide: 512.
        conv_dim: rank for 3×3 convolutions of the UNet's ResNet blocks; 0 leaves them out.
        clamp_quantile: clamp the factors at this quantile of their absolute values; 1 = no clamp (the guide).
        min_diff: a text encoder whose largest |finetuned − base| is not above this is left out.
        save_dtype: dtype of the saved LoRA.
        svd: `full` (exact, LAPACK) or `lowrank` (randomised `torch.svd_lowrank`, several times
            faster at dim ≪ layer width, error within ~0.1% of `full`; see benchmarks/extract.py).
        from_ema: extract from the EMA weights saved beside each checkpoint (`finetune.ema_decay` > 0).
    """

    model: ModelParams
    dim: int = Field(128, ge=1)
    conv_dim: int = Field(0, ge=0)
    clamp_quantile: float = Field(1.0, gt=0, le=1)
    min_diff: float = Field(1e-6, ge=0)
    save_dtype: Literal["float32", "float16", "bfloat16"] = "float16"
    svd: Literal["full", "lowrank"] = "full"
    from_ema: bool = False
