"""loraforge: Stable Diffusion LoRA training as one declarative, reproducible pipeline."""

import logging

__version__ = "0.1.0"

# bitsandbytes (imported by peft whenever it is installed) warns at import that its optional CPU
# 4-bit matmul kernels are missing; loraforge never uses 4-bit matmuls, so the warning is noise.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
