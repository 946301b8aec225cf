"""`model.vae`: a VAE folder or single file (diffusers or original layout) replaces the base
model's VAE in loading, in its hash, and so in the latent cache keys and evaluation renders."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from loraforge.errors import InputError, MissingInput
from loraforge.models.loading import component_hash, load_pipeline, load_vae, resolve_model
from loraforge.models.original_layout import vae_to_original
from loraforge.pipeline.params import ModelParams
from loraforge.models.safetensors_io import save_tensors
from loraforge.models.tiny import build_tiny_sdxl
from tests.test_latents import SDXL, ingest, latents, tensors, write_images


@pytest.fixture(scope="module")
def other_vae() -> torch.nn.Module:
    """A tiny SDXL-shaped VAE with other weights than the builtin's (seed 1)."""
    return build_tiny_sdxl(seed=1)["vae"]


def vae_forms(vae: torch.nn.Module, folder: Path) -> dict[str, Path]:
    """The same VAE as a diffusers folder, a diffusers-layout file and an original-layout file."""
    vae.save_pretrained(folder / "vae-folder", safe_serialization=True)
    save_tensors(dict(vae.state_dict()), folder / "vae-diffusers.safetensors")
    save_tensors(vae_to_original(vae.state_dict()), folder / "vae-original.safetensors")
    return {
        "folder": folder / "vae-folder",
        "diffusers file": folder / "vae-diffusers.safetensors",
        "original file": folder / "vae-original.safetensors",
    }


def test_every_form_loads_the_same_weights_and_changes_only_the_vae_hash(
    other_vae: torch.nn.Module, tmp_path: Path, state_dir: Path
) -> None:
    base = resolve_model(SDXL, state_dir)
    want = other_vae.state_dict()
    hashes = set()
    for form, path in vae_forms(other_vae, tmp_path).items():
        info = resolve_model(ModelParams(base="builtin:tiny-sdxl", vae=str(path)), state_dir)
        got = load_vae(info, torch.device("cpu")).state_dict()
        assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want), form
        assert component_hash(info, "unet", state_dir) == component_hash(base, "unet", state_dir)
        hashes.add(component_hash(info, "vae", state_dir))
        assert (
            load_pipeline(info, torch.device("cpu"))
            .vae.state_dict()["encoder.conv_in.weight"]
            .equal(want["encoder.conv_in.weight"])
        ), form  # evaluation renders through the swapped VAE
    assert component_hash(base, "vae", state_dir) not in hashes


def test_latents_follow_the_vae(other_vae: torch.nn.Module, tmp_path: Path, state_dir: Path) -> None:
    work = tmp_path / "work"
    images = ingest(write_images(tmp_path / "src"), work, state_dir)
    latents(images, work, state_dir)
    before = tensors(work / "latents")
    swapped = ModelParams(
        base="builtin:tiny-sdxl", device="cpu", vae=str(vae_forms(other_vae, tmp_path)["original file"])
    )
    summary, out = latents(images, work, state_dir, model=swapped)
    assert (summary["computed"], summary["reused"]) == (4, 0)
    after = tensors(out)
    assert all(not torch.allclose(after[f], before[f]) for f in after)
    summary, _ = latents(images, work, state_dir)  # back to the base VAE: its entries are still there
    assert (summary["computed"], summary["reused"]) == (0, 4)


def test_bad_vae_is_refused_by_name(tmp_path: Path, state_dir: Path) -> None:
    with pytest.raises(MissingInput, match="model.vae"):
        resolve_model(ModelParams(base="builtin:tiny-sdxl", vae=str(tmp_path / "nope.safetensors")), state_dir)
    save_tensors({"lora_unet_x.alpha": torch.ones(())}, tmp_path / "lora.safetensors")
    with pytest.raises(InputError, match="lora.safetensors"):
        resolve_model(ModelParams(base="builtin:tiny-sdxl", vae=str(tmp_path / "lora.safetensors")), state_dir)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="not a diffusers VAE folder"):
        resolve_model(ModelParams(base="builtin:tiny-sdxl", vae=str(tmp_path / "empty")), state_dir)
