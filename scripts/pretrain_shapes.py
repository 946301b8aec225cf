"""Pretrain the builtin `shapes-sd15` and `shapes-sdxl` models from scratch on the shapes world.

    python scripts/pretrain_shapes.py vae                 # the VAE both models share
    python scripts/pretrain_shapes.py latents             # the world's training set, VAE-encoded
    python scripts/pretrain_shapes.py unet --arch sdxl    # one UNet (run sd15 beside it: 1 thread each)
    python scripts/pretrain_shapes.py export --arch sdxl  # fp16 diffusers folder in loraforge/assets/builtin/

The recipe, in SD's own order: a VAE first (`AutoencoderKL`, 8× down, 4 latent channels; trained
on 64 px crops of plain and styled world images, L1 + MSE + a small KL; its scaling factor is
1 / std of the world's latents), then the UNet on cached latents with the text encoders frozen as
in SD (the seeded random CLIP encoders of `builtin:tiny-*`: they are never trained, and the UNet
learns to read them), ε-prediction on SD's noise schedule, min-SNR-γ 5, 10% caption dropout to ""
for classifier-free guidance, AdamW with warmup, an EMA of the weights (what is exported).

Everything is deterministic from `--seed` (batch, noise and timesteps come from (seed, step), drawn
on the CPU whatever the device) at a fixed torch thread count (one per process:
`torch.set_num_threads(1)`); `--device cuda` runs the same recipe on a GPU in minutes (float32,
so the numbers stay close to the CPU run's, not bitwise equal). Every phase resumes
from its own newest checkpoint under `--state` (default `~/.cache/loraforge/pretrain-shapes`,
outside git), so a run of hours goes on across sessions: rerun the same command. Each phase
appends its evaluation to `<state>/<phase>.tsv` (VAE: PSNR on held-out world images; UNet: the
oracle's colour and background accuracy of guided samples, seen and held-out combinations).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from loraforge.models.conditioning import encode_sd15, encode_sdxl, sdxl_time_ids  # noqa: E402
from loraforge.models.tiny import SD_SCHEDULE, build_tiny_sd15, build_tiny_sdxl  # noqa: E402
from loraforge.shapes.oracle import read  # noqa: E402
from loraforge.shapes.world import SIZE, combinations, random_scene, render, scenes  # noqa: E402

DEFAULT_STATE = Path(os.environ.get("LORAFORGE_PRETRAIN_STATE", Path.home() / ".cache/loraforge/pretrain-shapes"))
EXPORT_DIR = ROOT / "loraforge" / "assets" / "builtin"
CHECKPOINT_EVERY = 250
LATENT_COUNT = 16384
MIN_SNR_GAMMA = 5.0
CAPTION_DROPOUT = 0.1
EMA_DECAY = 0.999
GUIDANCE = 6.0
SAMPLE_STEPS = 20
DEVICE = torch.device("cpu")  # set from --device in main()


# --- the models ---------------------------------------------------------------------------------


def build_vae() -> Any:
    """8× down, 4 latent channels, 0.32 M weights (real SD: 84 M)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 32, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=SIZE,
    )


def build_unet(arch: str) -> Any:
    """SD1.5 or SDXL layout, 3 levels over the 16×16 latents, 1.5 M / 1.7 M weights."""
    from diffusers import UNet2DConditionModel

    common = dict(sample_size=SIZE // 8, in_channels=4, out_channels=4, block_out_channels=(32, 64, 64))
    if arch == "sd15":  # cross-attention in the high-resolution levels, conv projections, one encoder
        return UNet2DConditionModel(
            **common,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            layers_per_block=1,
            attention_head_dim=4,
            use_linear_projection=False,
            cross_attention_dim=32,
            norm_num_groups=8,
        )
    return UNet2DConditionModel(  # SDXL: attention in the low-resolution levels, linear projections, size conditioning
        **common,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        attention_head_dim=(2, 4, 4),
        use_linear_projection=True,
        transformer_layers_per_block=1,
        cross_attention_dim=64,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 32,
        norm_num_groups=8,
    )


def frozen_text(arch: str) -> dict[str, Any]:
    """The text side of `builtin:tiny-<arch>` (seed 0): tokenizers and encoders, frozen."""
    parts = (build_tiny_sdxl if arch == "sdxl" else build_tiny_sd15)(0)
    keep = ("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2")
    text = {k: v for k, v in parts.items() if k in keep}
    for name in ("text_encoder", "text_encoder_2"):
        if name in text:
            text[name].requires_grad_(False).eval()
    return text


# --- checkpoints ----------------------------------------------------------------------------------


def save_checkpoint(folder: Path, step: int, modules: dict[str, torch.nn.Module], optimizer: Any) -> None:
    """`folder/step-NNNNNN/` (weights as safetensors, optimizer with torch.save), written atomically;
    older checkpoints removed."""
    from safetensors.torch import save_file

    final = folder / f"step-{step:06d}"
    tmp = folder / f".tmp-step-{step:06d}"
    tmp.mkdir(parents=True, exist_ok=True)
    for name, module in modules.items():
        state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
        save_file(state, str(tmp / f"{name}.safetensors"))
    torch.save({"optimizer": optimizer.state_dict(), "step": step}, tmp / "training.pt")
    tmp.rename(final)
    for old in folder.glob("step-*"):
        if old != final:
            for f in old.iterdir():
                f.unlink()
            old.rmdir()


def load_checkpoint(folder: Path, modules: dict[str, torch.nn.Module], optimizer: Any) -> int:
    """Restore the newest checkpoint under `folder`; the step it was taken at (0: none)."""
    from safetensors.torch import load_file

    found = sorted(folder.glob("step-*"))
    if not found:
        return 0
    for name, module in modules.items():
        module.load_state_dict(load_file(str(found[-1] / f"{name}.safetensors")))
    blob = torch.load(found[-1] / "training.pt", weights_only=True, map_location=DEVICE)
    optimizer.load_state_dict(blob["optimizer"])
    print(f"resumed from {found[-1]}", flush=True)
    return int(blob["step"])


def log_row(path: Path, row: dict[str, Any]) -> None:
    new = not path.exists()
    with open(path, "a", encoding="utf-8") as f:
        if new:
            f.write("\t".join(row) + "\n")
        f.write("\t".join(f"{v:.4f}" if isinstance(v, float) else str(v) for v in row.values()) + "\n")
    print("  ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)


def lr_at(step: int, peak: float, warmup: int, total: int) -> float:
    """Linear warmup, then cosine down to a tenth of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


# --- the VAE ----------------------------------------------------------------------------------


def to_tensor(images: list[Any]) -> torch.Tensor:
    """PIL images -> (B, 3, H, W) in [-1, 1]."""
    array = np.stack([np.asarray(im, dtype=np.float32) for im in images]) / 127.5 - 1.0
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()


def vae_batch(seed: int, step: int, batch: int, crop: int = 64) -> torch.Tensor:
    """`batch` random 64 px crops of world images, 30% of them styled (the VAE must carry the
    demo's style too)."""
    rng = random.Random(seed * 1_000_003 + step)
    combos = combinations(None)
    crops = []
    for _ in range(batch):
        image = render(random_scene(rng, combos, styled=rng.random() < 0.3))
        x, y = rng.randrange(SIZE - crop + 1), rng.randrange(SIZE - crop + 1)
        crops.append(image.crop((x, y, x + crop, y + crop)))
    return to_tensor(crops)


def vae_psnr(vae: Any, count: int = 64, seed: int = 99) -> float:
    """Mean PSNR (dB) of the VAE's reconstructions of whole held-out-seed world images, half styled."""
    images = [render(s) for s in scenes(seed, count // 2, held_out=None)]
    images += [render(s) for s in scenes(seed + 1, count - count // 2, held_out=None, styled=True)]
    x = to_tensor(images).to(DEVICE)
    with torch.no_grad():
        y = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
    mse = ((x - y) / 2).pow(2).flatten(1).mean(1)
    return float((10 * torch.log10(1 / mse)).mean())


def train_vae(args: argparse.Namespace) -> None:
    folder = args.state / "vae"
    torch.manual_seed(args.seed)
    vae = build_vae().to(DEVICE)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    step = load_checkpoint(folder, {"vae": vae}, optimizer)
    while step < args.vae_steps:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args.vae_lr, 200, args.vae_steps)
        x = vae_batch(args.seed, step, args.vae_batch).to(DEVICE)
        posterior = vae.encode(x).latent_dist
        eps = torch.randn(posterior.mean.shape, generator=torch.Generator().manual_seed(args.seed + step))
        recon = vae.decode(posterior.mean + posterior.std * eps.to(DEVICE)).sample
        loss = F.l1_loss(recon, x) + F.mse_loss(recon, x) + 1e-6 * posterior.kl().mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if step % CHECKPOINT_EVERY == 0 or step == args.vae_steps:
            save_checkpoint(folder, step, {"vae": vae}, optimizer)
        if step % args.eval_every == 0 or step == args.vae_steps:
            log_row(
                args.state / "vae.tsv", {"step": step, "loss": float(loss), "psnr": vae_psnr(vae), "time": time.time()}
            )


def load_trained_vae(state: Path) -> Any:
    from safetensors.torch import load_file

    found = sorted((state / "vae").glob("step-*"))
    if not found:
        raise SystemExit(f"no VAE checkpoint under {state / 'vae'}: run the `vae` phase first")
    vae = build_vae()
    vae.load_state_dict(load_file(str(found[-1] / "vae.safetensors")))
    return vae.to(DEVICE).eval().requires_grad_(False)


# --- the training set -------------------------------------------------------------------------


def encode_world(args: argparse.Namespace) -> None:
    """`<state>/latents.safetensors`: `--latent-count` plain world scenes (held-out combinations never
    among them), VAE-encoded (posterior mean, unscaled), and their captions; the std gives the
    models' scaling factor."""
    from safetensors.torch import save_file

    vae = load_trained_vae(args.state)
    world = list(scenes(args.seed + 17, args.latent_count, held_out=False))
    chunks = []
    for start in range(0, len(world), 64):
        x = to_tensor([render(s) for s in world[start : start + 64]]).to(DEVICE)
        with torch.no_grad():
            chunks.append(vae.encode(x).latent_dist.mode().cpu())
        print(f"encoded {start + len(x)}/{len(world)}", end="\r", flush=True)
    latents = torch.cat(chunks)
    captions = [s.caption for s in world]
    meta = {"captions": json.dumps(captions), "std": f"{float(latents.std()):.6f}"}
    save_file({"latents": latents.contiguous()}, str(args.state / "latents.safetensors"), metadata=meta)
    print(f"\nlatents {tuple(latents.shape)} std {float(latents.std()):.4f}", flush=True)


def load_world(state: Path) -> tuple[torch.Tensor, list[str], float]:
    from safetensors import safe_open

    with safe_open(str(state / "latents.safetensors"), "pt") as f:
        meta = f.metadata()
        latents = f.get_tensor("latents")
    return latents, json.loads(meta["captions"]), 1.0 / float(meta["std"])


# --- the UNet ---------------------------------------------------------------------------------


def text_table(arch: str, text: dict[str, Any], captions: list[str]) -> dict[str, tuple[torch.Tensor, ...]]:
    """caption -> its conditioning, computed once per distinct caption ("" included)."""
    table = {}
    with torch.no_grad():
        for caption in sorted(set(captions) | {""}):
            if arch == "sdxl":
                tokenizers = [text["tokenizer"], text["tokenizer_2"]]
                hidden, pooled = encode_sdxl(tokenizers, [text["text_encoder"], text["text_encoder_2"]], [caption])
                table[caption] = (hidden[0], pooled[0])
            else:
                table[caption] = (encode_sd15(text["tokenizer"], text["text_encoder"], [caption])[0],)
    return table


def unet_loss(
    arch: str,
    unet: Any,
    scheduler: Any,
    batch: torch.Tensor,
    cond: list[tuple[torch.Tensor, ...]],
    gen: torch.Generator,
) -> torch.Tensor:
    """ε-prediction loss with min-SNR-γ weights on one batch of scaled latents."""
    noise = torch.randn(batch.shape, generator=gen)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (batch.shape[0],), generator=gen)
    alphas = scheduler.alphas_cumprod[t]
    snr = alphas / (1 - alphas)
    weights = (torch.clamp(snr, max=MIN_SNR_GAMMA) / snr).to(DEVICE)
    noisy = scheduler.add_noise(batch, noise, t).to(DEVICE)
    noise, t = noise.to(DEVICE), t.to(DEVICE)
    hidden = torch.stack([c[0] for c in cond]).to(DEVICE)
    extra = {}
    if arch == "sdxl":
        ids = sdxl_time_ids([[SIZE, SIZE]] * len(cond), [[0, 0]] * len(cond), (SIZE, SIZE))
        pooled = torch.stack([c[1] for c in cond]).to(DEVICE)
        extra["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": ids.to(DEVICE)}
    pred = unet(noisy, t, hidden, **extra).sample
    return (F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3)) * weights).mean()


def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.lerp_(p, 1 - decay)


def make_pipeline(arch: str, unet: Any, vae: Any, text: dict[str, Any], scale: float) -> Any:
    """A diffusers pipeline of the model as it would ship (Euler, the VAE's scaling factor)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    vae = copy.deepcopy(vae)
    vae.register_to_config(scaling_factor=scale, force_upcast=False)
    scheduler = EulerDiscreteScheduler(**SD_SCHEDULE)
    text = {k: v.to(DEVICE) if hasattr(v, "to") else v for k, v in text.items()}
    if arch == "sdxl":
        return StableDiffusionXLPipeline(
            unet=unet, vae=vae, scheduler=scheduler, add_watermarker=False, force_zeros_for_empty_prompt=False, **text
        )
    return StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
        **text,
    )


def sample_accuracy(pipe: Any, seed: int, per_group: int = 24) -> dict[str, float]:
    """The oracle on guided samples: colour and background right, seen and held-out combinations."""
    result = {}
    for name, held in (("seen", False), ("held", True)):
        group = list(scenes(seed + (1 if held else 0), per_group, held_out=held))
        images = pipe(
            [s.caption for s in group],
            num_inference_steps=SAMPLE_STEPS,
            guidance_scale=GUIDANCE,
            height=SIZE,
            width=SIZE,
            generator=torch.Generator().manual_seed(seed),
        ).images
        readings = [read(im) for im in images]
        result[f"{name}_colour"] = float(np.mean([r.colour == s.colour for s, r in zip(group, readings)]))
        result[f"{name}_background"] = float(np.mean([r.background == s.background for s, r in zip(group, readings)]))
        result[f"{name}_shape"] = float(np.mean([r.shape == s.shape for s, r in zip(group, readings)]))
    return result


def train_unet(args: argparse.Namespace) -> None:
    from diffusers import DDPMScheduler

    folder = args.state / f"unet-{args.arch}"
    latents, captions, scale = load_world(args.state)
    text = frozen_text(args.arch)
    table = text_table(args.arch, text, captions)
    torch.manual_seed(args.seed)
    unet = build_unet(args.arch).to(DEVICE)
    ema = copy.deepcopy(unet).requires_grad_(False)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=args.unet_lr, weight_decay=0.01)
    step = load_checkpoint(folder, {"unet": unet, "ema": ema}, optimizer)
    scheduler = DDPMScheduler(**{k: v for k, v in SD_SCHEDULE.items() if k != "timestep_spacing"})
    vae = load_trained_vae(args.state)
    while step < args.unet_steps:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args.unet_lr, 500, args.unet_steps)
        gen = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
        index = torch.randint(0, len(latents), (args.batch,), generator=gen)
        drop = torch.rand(args.batch, generator=gen) < CAPTION_DROPOUT
        cond = [table["" if d else captions[i]] for i, d in zip(index.tolist(), drop.tolist())]
        loss = unet_loss(args.arch, unet, scheduler, latents[index] * scale, cond, gen)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema_update(ema, unet, EMA_DECAY if step > 500 else 0.9)
        step += 1
        if step % CHECKPOINT_EVERY == 0 or step == args.unet_steps:
            save_checkpoint(folder, step, {"unet": unet, "ema": ema}, optimizer)
        if step % args.eval_every == 0 or step == args.unet_steps:
            pipe = make_pipeline(args.arch, ema, vae, text, scale)
            pipe.set_progress_bar_config(disable=True)
            row = {"step": step, "loss": float(loss), **sample_accuracy(pipe, args.seed), "time": time.time()}
            log_row(args.state / f"unet-{args.arch}.tsv", row)


# --- export -------------------------------------------------------------------------------------


def git_revision() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"


def export(args: argparse.Namespace) -> None:
    """`loraforge/assets/builtin/shapes-<arch>/`: the EMA UNet, the VAE and the frozen encoders as a
    diffusers folder in fp16, each weight file's metadata naming the recipe."""
    from safetensors.torch import load_file, save_file

    found = sorted((args.state / f"unet-{args.arch}").glob("step-*"))
    if not found:
        raise SystemExit(f"no UNet checkpoint for {args.arch}: run the `unet` phase first")
    unet = build_unet(args.arch)
    unet.load_state_dict(load_file(str(found[-1] / "ema.safetensors")))
    _, _, scale = load_world(args.state)
    pipe = make_pipeline(args.arch, unet, load_trained_vae(args.state), frozen_text(args.arch), scale)
    out = args.out / f"shapes-{args.arch}"
    for module in pipe.components.values():  # each module to fp16 (the pipeline's own .to() warns on CPU)
        if isinstance(module, torch.nn.Module):
            module.to("cpu", torch.float16)
    pipe.save_pretrained(out, safe_serialization=True)
    recipe = {
        "recipe": "scripts/pretrain_shapes.py",
        "seed": str(args.seed),
        "unet_steps": found[-1].name.removeprefix("step-"),
        "git_revision": git_revision(),
    }
    for weights in out.rglob("*.safetensors"):
        save_file(load_file(str(weights)), str(weights), metadata={**recipe, "format": "pt"})
    (out / "RECIPE.json").write_text(json.dumps(recipe, indent=2) + "\n")
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"wrote {out} ({size / 2**20:.2f} MiB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("phase", choices=["vae", "latents", "unet", "export"])
    parser.add_argument("--arch", choices=["sd15", "sdxl"], default="sdxl")
    parser.add_argument("--state", type=Path, default=DEFAULT_STATE)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--vae-steps", type=int, default=4000)
    parser.add_argument("--vae-batch", type=int, default=16)
    parser.add_argument("--vae-lr", type=float, default=1e-3)
    parser.add_argument("--unet-steps", type=int, default=12000)
    parser.add_argument("--unet-lr", type=float, default=1e-3)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--eval-every", type=int, default=500)
    parser.add_argument("--latent-count", type=int, default=LATENT_COUNT)
    parser.add_argument("--out", type=Path, default=EXPORT_DIR, help="where `export` writes shapes-<arch>/")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    global DEVICE
    DEVICE = torch.device(args.device)
    args.state.mkdir(parents=True, exist_ok=True)
    {"vae": train_vae, "latents": encode_world, "unet": train_unet, "export": export}[args.phase](args)


if __name__ == "__main__":
    main()
