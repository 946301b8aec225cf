"""Will it train, and will it fit: the guides' step arithmetic and the memory of one training
process, term by term, and the `loraforge plan` command that prints both.

    steps         the training plan (000 and 002 guides' formulas, `build_plan`)
    memory        the memory estimate: persistent + max(forward, backward, step), pure arithmetic
    activations   activation memory of a training step, from the UNet's config
    model_sizes   parameter counts of the model and its LoRA (`ParamStats`)
    memory_plan   the finetune params as a memory `Setup`, the breakdown and the verdict
    command       `loraforge plan`

May import `store`, `pipeline`, `models`, `data`, `lora` and `training`.
"""

MAY_IMPORT = ("store", "pipeline", "models", "data", "lora", "training")
