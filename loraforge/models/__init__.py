"""The models a stage loads, and the files they come from: SD1.5 and SDXL, builtin, single-file,
local diffusers folder or Hugging Face id; safetensors only unless pickle is opted into.

    loading          `resolve_model`, `load_component`, device and dtype choice (`ModelInfo`)
    hub              where `model.base` comes from: a builtin, a local folder or the hub
    tiny             the seeded random `builtin:tiny-*` models, built in code
    single_file      original-layout checkpoints (A1111, ComfyUI, Civitai) converted to diffusers
    original_layout  diffusers <-> original (ldm/sgm) key names of whole models
    kohya_names      module names as kohya writes them (diffusers <-> sgm UNet names): shared by
                     single-file loading and LoRA files, so it lives here, below `lora`
    vae_override     `model.vae`: a separate VAE file
    weights          the weight files of a folder, their content hashes, pickle refusal
    safetensors_io   safetensors read and written (sorted headers, one tensor at a time)
    conditioning     text and SDXL size conditioning
    vae              VAE encoding of training crops
    hf_quiet         diffusers/transformers loading without progress-bar noise

May import `store` and `pipeline`.
"""

MAY_IMPORT = ("store", "pipeline")
