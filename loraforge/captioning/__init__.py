"""Machine captioners for the caption stage: BLIP (transformers) and WD14-style ONNX taggers.

    captioners  the captioner interface, local folder or Hugging Face id, output cached per image
    blip        BLIP captions
    wd14        WD14 tags (onnxruntime), thresholds and tag pruning

May import `store`, `pipeline` and `models`.
"""

MAY_IMPORT = ("store", "pipeline", "models")
