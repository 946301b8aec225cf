"""The shapes world: a procedural world of plain shapes in named colours, and an oracle that reads
an image of it back. The builtin `shapes-*` models were pretrained on it
(`scripts/pretrain_shapes.py`); the demo's LoRA learns a style in it; tests and benchmarks judge
renders with the oracle (the evaluate stage never uses it: it works for real models).

    world   scenes, captions and images, deterministic from a seed; the demo's style
    oracle  shape colour, background colour, shape and style score read off an image

Imports nothing of loraforge (numpy and PIL only).
"""

MAY_IMPORT = ()
