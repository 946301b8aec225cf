"""loraforge: Stable Diffusion LoRA training as one declarative, reproducible pipeline."""

__version__ = "0.1.0"
