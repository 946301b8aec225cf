"""Training throughput: loraforge's finetune loop against a plain reference diffusers training
loop (the core of diffusers' train_text_to_image.py) on the same model, data, resolution and batch.

    python benchmarks/train_throughput.py [--arch sd15|sdxl] [--epochs 3] [--batch 4]

Both loops read the same cached latents from disk, keep the text encoder(s) frozen, use AdamW
and float32 (bf16 autocast on GPU), and are timed from their first step to their last (model
loading excluded). Prints samples/s of each and the ratio loraforge / reference. CPU: the tiny
builtin model; on a CUDA GPU `--arch sdxl` times the tiny SDXL-shaped UNet.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.helpers import make_project, set_params  # noqa: E402


class Clock:
    """A publisher that timestamps every training step (finetune reports progress once per step)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def table(self, *a: Any, **k: Any) -> None:
        pass

    def markdown(self, *a: Any, **k: Any) -> None:
        pass

    def progress(self, fraction: float, description: str = "") -> None:
        self.times.append(time.perf_counter())


def loraforge_loop(project: Path, params: dict[str, Any]) -> tuple[int, float]:
    """(steps, seconds from the end of step 1 to the end of the last step) of stages.finetune."""
    from loraforge.pipeline.runner import Paths, StageEnv
    from loraforge.store.items import ItemStore
    from stages import finetune

    out = project / "bench-out"
    shutil.rmtree(out, ignore_errors=True)
    (out / "checkpoints").mkdir(parents=True)
    clock = Clock()
    env = StageEnv(
        store=ItemStore(project / ".loraforge" / "store"),
        state_dir=project / ".loraforge",
        publish=clock,
        show_progress=False,
    )
    finetune.run(
        finetune.Params(**params),
        Paths(latents=project / "data" / "latents", captions=project / "data" / "captions"),
        Paths(checkpoints=out / "checkpoints", loss=out / "loss"),
        env,
    )
    return len(clock.times) - 1, clock.times[-1] - clock.times[0]


def reference_loop(project: Path, params: dict[str, Any]) -> tuple[int, float]:
    """The same training, written as diffusers' example scripts write it: (steps, seconds)."""
    import torch
    import torch.nn.functional as F

    from loraforge.models.conditioning import encode_sd15, encode_sdxl, sdxl_time_ids
    from loraforge.models.loading import load_noise_scheduler, load_text_encoders, load_unet, resolve_model
    from loraforge.pipeline.params import ModelParams
    from loraforge.training.data import epoch_batches, load_examples, load_latents

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    info = resolve_model(ModelParams(**params["model"]), project / ".loraforge")
    unet = load_unet(info, device).train()
    pairs = load_text_encoders(info, device)
    tokenizers, encoders = [t for t, _ in pairs], [e.requires_grad_(False) for _, e in pairs]
    scheduler = load_noise_scheduler(info)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=params["lr"], weight_decay=1e-2)
    examples = load_examples(project / "data" / "latents", project / "data" / "captions", 1)
    times = []
    for epoch in range(1, params["epochs"] + 1):
        for batch in epoch_batches(examples, params["batch_size"], params["seed"], epoch):
            latents = load_latents(batch, info.scaling_factor).to(device)
            captions = [e["caption"] for e in batch]
            with torch.no_grad():
                if info.arch == "sd15":
                    hidden, added = encode_sd15(tokenizers[0], encoders[0], captions), None
                else:
                    hidden, pooled = encode_sdxl(tokenizers, encoders, captions)
                    w, h = batch[0]["bucket"]
                    ids = sdxl_time_ids(
                        [e["original_size"] for e in batch], [e["crop_top_left"] for e in batch], (h, w)
                    ).to(device)
                    added = {"text_embeds": pooled, "time_ids": ids}
            noise = torch.randn_like(latents)
            t = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), device=device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                pred = unet(
                    scheduler.add_noise(latents, noise, t), t, encoder_hidden_states=hidden, added_cond_kwargs=added
                ).sample
            loss = F.mse_loss(pred.float(), noise.float())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            loss.item()  # sync, as the loraforge loop does to log the loss
            times.append(time.perf_counter())
    return len(times) - 1, times[-1] - times[0]


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=["sd15", "sdxl"], default="sd15")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()
    gpu = torch.cuda.is_available()
    params = {
        "model": {"base": f"builtin:tiny-{args.arch}"},
        "epochs": args.epochs,
        "batch_size": args.batch,
        "lr": 1e-4,
        "seed": 42,
        "train_text_encoder": False,
        "save_dtype": "float32",
        "mixed_precision": "bf16" if gpu else "no",
    }
    with tempfile.TemporaryDirectory() as tmp:
        project = make_project(Path(tmp) / "bench", params={}, git=False)
        set_params(project, {"model": {"base": params["model"]["base"]}})
        from loraforge.pipeline.runner import run_stage

        for stage in ("ingest", "upscale", "caption", "latents"):
            run_stage(project, stage)
        loraforge_loop(
            project, {**params, "epochs": 1}
        )  # warm-up: fills the text-encoder cache, as a second run would find it
        rows = [
            ("reference (diffusers example loop)", *reference_loop(project, params)),
            ("loraforge finetune", *loraforge_loop(project, params)),
        ]
    device = torch.cuda.get_device_name() if gpu else "CPU"
    print(
        f"{args.arch} tiny model, batch {args.batch}, {args.epochs} epochs, {device}, "
        f"torch threads {torch.get_num_threads()}"
    )
    print(f"{'loop':<36} {'steps':>6} {'seconds':>8} {'samples/s':>10}")
    rates = []
    for name, steps, seconds in rows:
        rate = steps * args.batch / seconds  # approximate: the last batch of a bucket may be smaller
        rates.append(rate)
        print(f"{name:<36} {steps:6d} {seconds:8.2f} {rate:10.1f}")
    print(f"ratio loraforge / reference: {rates[1] / rates[0]:.3f}")


if __name__ == "__main__":
    main()
