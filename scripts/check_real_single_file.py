"""One-off check that the shipped real-size configs load a real-shaped single file (no download).

Builds an SD1.5- or SDXL-shaped pipeline with random weights from `loraforge/assets` (the real
sizes: 860 M / 2.6 G UNet parameters), writes it as one original-layout fp16 `.safetensors`,
resolves it as `model.base` with no `model.config` (architecture from the keys, shipped configs),
and compares every weight. Needs ~8 GB RAM for SD1.5, ~25 GB for SDXL; not part of the test suite.

    python scripts/check_real_single_file.py sd15 /tmp/real-check
"""

from __future__ import annotations

import gc
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open


def main(arch: str, work: Path) -> None:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from loraforge.models.loading import load_text_encoders, load_unet, load_vae, resolve_model
    from loraforge.models.original_layout import states_to_original
    from loraforge.pipeline.params import ModelParams
    from loraforge.models.safetensors_io import save_tensors
    from loraforge.models.single_file import shipped_config

    torch.manual_seed(0)
    torch.set_default_dtype(torch.float16)  # build in fp16: an SDXL-sized model fits in ~16 GB RAM
    folder = shipped_config(arch, work / "config")
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
    states = {"unet": unet.state_dict()}
    states["vae"] = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae")).state_dict()
    states["text_encoder"] = CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder")).state_dict()
    if arch == "sdxl":
        te2 = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(folder / "text_encoder_2"))
        states["text_encoder_2"] = te2.state_dict()
    torch.set_default_dtype(torch.float32)
    file = work / f"real-{arch}.safetensors"
    save_tensors(states_to_original(states, dict(unet.config), arch), file)
    config = dict(unet.config)
    del unet, states  # compared below against the file, tensor by tensor
    gc.collect()
    print(f"wrote {file} ({file.stat().st_size / 1e9:.2f} GB)")
    started = time.perf_counter()
    info = resolve_model(ModelParams(base=str(file)), work / "state")
    print(f"converted to {info.path} in {time.perf_counter() - started:.0f} s; arch {info.arch}")
    cpu = torch.device("cpu")
    loaded = {"unet": load_unet(info, cpu, torch.float16), "vae": load_vae(info, cpu, torch.float16)}
    loaded |= dict(
        zip(("text_encoder", "text_encoder_2"), (e for _, e in load_text_encoders(info, cpu, torch.float16)))
    )
    back = states_to_original({n: m.state_dict() for n, m in loaded.items()}, config, arch)
    with safe_open(str(file), "pt") as f:
        keys = set(f.keys())
        same = keys == set(back) and all(torch.equal(f.get_tensor(k), back[k]) for k in keys)
    print(f"{len(keys)} tensors, loaded back through loraforge and written again: equal {same}")


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
