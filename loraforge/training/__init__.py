"""The parts of the finetune loop that are not the loop. `stages/finetune.py` reads top to bottom
and calls these; each module is one concern, small enough to read on its own, and takes the
scalars or small frozen settings dataclasses it needs (never the stage's params):

    data        examples, epoch batches, sharding, the steps plan, latents, prefetch, captions
    settings    combinations that cannot work, the LR of each component
    setup       accelerator, model components, what trains, accelerate's wrapping (`Training`)
    step        step settings, random source, divergence guard, gradient sync, optimizer step
    losses      noise, timesteps and the weighted diffusion loss
    optimizers, schedules, precision, ema, lora_net, captions, text_cache
    lycoris_net LoHa / LoKr / DoRA networks (lycoris-lora modules on the LoRA targets)
    fused       per-parameter optimizers: fused backward, bf16 weights (stochastic_rounding)
    validation  held-out images and the validation loss on fixed draws
    prior       prior preservation: class images (generated or `reg_images`) and their loss
    checkpoints the files an epoch saves (full weights or a kohya LoRA, meta.json)
    progress    step and epoch rows, their TSV tables, the stage report
    resume      exact resume state, outside the stage outputs
    launch      data-parallel processes through accelerate

May import `store`, `pipeline`, `models`, `data` and `lora`.
"""

MAY_IMPORT = ("store", "pipeline", "models", "data", "lora")
