"""LoRA files: the kohya format, extraction from weight differences, rank reduction, LyCORIS files,
and the standalone `loraforge extract` / `loraforge resize` commands.

    format      which layers carry a LoRA, kohya key names, header metadata, save, load, apply
    svd         truncated SVD of a weight difference (full or low-rank)
    extraction  streamed readers of model sources, per-component extraction, the git revision
    resize      rank reduction: fixed, sv_ratio, sv_fro, sv_cumulative
    lycoris     LoHa / LoKr / DoRA files (LyCORIS key names) read and recognised
    commands    `loraforge extract` and `loraforge resize`, outside the pipeline

May import `store`, `pipeline` and `models`.
"""

MAY_IMPORT = ("store", "pipeline", "models")
