"""What the evaluate stage measures and shows: renders with a LoRA at each weight, grids,
image metrics, the epoch pick, the HTML page, and `loraforge compare`.

    render         fixed-seed renders of a LoRA (or LyCORIS file) at a weight, cached per image
    grids          renders laid out as seed × weight grids
    metrics        pixel metrics: saturation, artifacts, memorisation, likeness
    embedding      CLIP image embeddings (optional `evaluate.clip_model`)
    epoch_metrics  per-epoch metrics and the recommendation (`best.json`)
    html_report    `reports/eval/index.html`
    compare        side-by-side page of DVC experiments or run folders (`loraforge compare`)

May import `store`, `pipeline`, `models`, `data` and `lora`.
"""

MAY_IMPORT = ("store", "pipeline", "models", "data", "lora")
