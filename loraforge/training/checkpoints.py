"""Checkpoints the finetune stage ships, and its loss/LR tables.

    epoch-NNNN/unet.safetensors, text_encoder*.safetensors   mode full: diffusers key names
    epoch-NNNN/lora.safetensors                              mode lora: kohya format, `ss_*` metadata
                                                             (LyCORIS keys with network_algo loha/lokr/dora)
    epoch-NNNN/model.safetensors                             finetune.save_single_file: the whole model,
                                                             original layout (A1111, ComfyUI)
    epoch-NNNN/meta.json                                     epoch, step, loss, model, settings
    epoch-NNNN/ema/...                                       the same files from the EMA weights

Every save refuses non-finite weights: a NaN never reaches a file the user keeps.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import xxhash
from safetensors.torch import save_file

from loraforge.lora.format import lora_metadata, save_lora
from loraforge.training.ema import EMA
from loraforge.training.lora_net import LoraSettings
from loraforge.training.settings import ENCODER_NAMES
from loraforge.errors import Diverged

# the settings a checkpoint's meta.json records (extract copies them into `ss_training_params`)
RECORD_KEYS = (
    "mode",
    "optimizer",
    "lr",
    "text_encoder_lr",
    "lr_scheduler",
    "epochs",
    "batch_size",
    "gradient_accumulation",
    "repeats",
    "mixed_precision",
    "weights_dtype",
    "fused_backward",
    "min_snr_gamma",
    "noise_offset",
    "ema_decay",
    "seed",
)


@dataclass(frozen=True)
class SaveSettings:
    """How a run's checkpoints are written.

    Attributes:
        mode: `finetune.mode`: `full` saves each trained component, `lora` one kohya LoRA file.
        dtype: the save dtype (`finetune.save_dtype`).
        arch: `sd15` or `sdxl` (the LoRA metadata's base model version and text encoders).
        lora: ranks and alphas (mode lora).
        lr: `finetune.lr`, recorded as `ss_learning_rate` (mode lora).
        optimizer: `finetune.optimizer`, recorded as `ss_optimizer` (mode lora).
        seed: `finetune.seed`, recorded as `ss_seed` (mode lora).
        about: the meta.json entries every checkpoint of the run shares, after epoch, step and loss
            (arch, base, ema, mode, dataset_hash, the `training_record`).
        save_single_file: also write `model.safetensors`, the whole model in original layout (mode full).
        model: the resolved base model (`ModelInfo`): the components that did not train, and the
            VAE the run used, come from it into the single file.
        save_last_n_epochs: keep only this many of the newest checkpoints; None = all.
    """

    mode: str
    dtype: torch.dtype
    arch: str
    lora: LoraSettings
    lr: float
    optimizer: str
    seed: int
    about: dict[str, Any]
    save_single_file: bool = False
    model: Any = None
    save_last_n_epochs: int | None = None


def training_record(params: Mapping[str, Any]) -> dict[str, Any]:
    """The settings a checkpoint's meta.json records, in `RECORD_KEYS` order.

    Args:
        params: the finetune params as a mapping (`dataclasses.asdict`).
    """
    return {key: params[key] for key in RECORD_KEYS}


def save_checkpoint(
    folder: Path, states: dict[str, dict[str, torch.Tensor]], dtype: torch.dtype, meta: dict[str, Any] | None
) -> None:
    """`<folder>/<component>.safetensors` (diffusers key names) + meta.json; refuses NaN weights.

    Args:
        folder: the checkpoint folder (created).
        states: component name -> state dict.
        dtype: the save dtype.
        meta: written as meta.json when given.
    """
    folder.mkdir(parents=True, exist_ok=True)
    for name, state in states.items():
        state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in state.items()}
        bad = [k for k, v in state.items() if not torch.isfinite(v).all()]
        if bad:
            raise Diverged(f"{name} has non-finite weights ({bad[0]}...); not saving {folder}")
        save_file(state, str(folder / f"{name}.safetensors"))
    if meta is not None:
        (folder / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")


def save_epoch(
    folder: Path,
    trained: dict[str, torch.nn.Module],
    ema: EMA | None,
    meta: dict[str, Any],
    s: SaveSettings,
    states: dict[str, dict[str, torch.Tensor]] | None = None,
) -> None:
    """One checkpoint: the trained components (mode full) or `lora.safetensors` (mode lora), and
    their EMA under `ema/` (what `extract.from_ema` reads).

    Args:
        folder: `.../epoch-NNNN`.
        trained: component name -> unwrapped module (or LoRA network in mode lora).
        ema: the EMA or None.
        meta: epoch, step, loss, arch, base, ... (meta.json).
        s: how to save.
        states: the weights to save by component (FSDP: gathered from the shards); None = `trained`'s own.
    """
    states = states if states is not None else {name: m.state_dict() for name, m in trained.items()}
    ema_states = {name: ema.state_dict(name) for name in trained} if ema is not None else None
    if s.mode == "lora":
        save_lora_checkpoint(folder, trained, states, meta, s)
        if ema_states is not None:
            save_lora_checkpoint(folder / "ema", trained, ema_states, None, s)
        return
    save_checkpoint(folder, states, s.dtype, meta)
    if ema_states is not None:
        save_checkpoint(folder / "ema", ema_states, s.dtype, None)
    if s.save_single_file:
        save_single_file(folder / "model.safetensors", s.model, states, s.dtype)
        if ema_states is not None:
            save_single_file(folder / "ema" / "model.safetensors", s.model, ema_states, s.dtype)


def save_single_file(file: Path, info: Any, trained: dict[str, dict[str, torch.Tensor]], dtype: torch.dtype) -> None:
    """The whole model as one original-layout `.safetensors` (what A1111 and ComfyUI load): the
    trained components' weights, the others (and the VAE the run used, `model.vae` included) from
    the base model's files.

    Args:
        file: the file to write.
        info: the resolved base model (`loraforge.models.loading.ModelInfo`).
        trained: component name -> trained state dict (diffusers / transformers key names).
        dtype: the save dtype.
    """
    from loraforge.models.loading import arch_components, component_folder, weight_files
    from loraforge.models.original_layout import states_to_original
    from loraforge.models.safetensors_io import load_tensors, save_tensors

    states = dict(trained)
    for name in arch_components(info.arch):
        if name not in states:
            states[name] = {}
            for part in weight_files(info, name):
                states[name] |= load_tensors(part, allow_pickle=info.allow_pickle, opt_in="model.allow_pickle")
    unet_config = json.loads((component_folder(info, "unet") / "config.json").read_text(encoding="utf-8"))
    tensors = {k: v.to("cpu", dtype) for k, v in states_to_original(states, unet_config, info.arch).items()}
    bad = [k for k, v in tensors.items() if not torch.isfinite(v).all()]
    if bad:
        raise FloatingPointError(f"non-finite weights ({bad[0]}...); not saving {file}")
    save_tensors(tensors, file, {"format": "pt", "loraforge_arch": info.arch})


def save_lora_checkpoint(
    folder: Path, networks: dict[str, Any], states: dict[str, Any], meta: dict[str, Any] | None, s: SaveSettings
) -> None:
    """`<folder>/lora.safetensors` in kohya format with `ss_*` metadata (+ meta.json); refuses NaN weights.

    Args:
        folder: the checkpoint folder.
        networks: component name -> LoRA network.
        states: component name -> the network state to save (live or EMA).
        meta: written as meta.json when given (its epoch and step go into the metadata).
        s: dtype, arch, ranks and alphas, and the training settings for the metadata.
    """
    tensors = {}
    for name, net in networks.items():
        tensors.update(
            {k: v.to("cpu", s.dtype) for k, v in net.kohya_state(s.lora.network_alpha, states[name]).items()}
        )
    bad = [k for k, v in tensors.items() if not torch.isfinite(v).all()]
    if bad:
        raise Diverged(f"LoRA has non-finite weights ({bad[0]}...); not saving {folder}")
    training = {
        "ss_training_comment": "loraforge finetune mode lora",
        "ss_learning_rate": s.lr,
        "ss_optimizer": s.optimizer,
        "ss_network_dropout": s.lora.network_dropout,
        "ss_seed": s.seed,
        "ss_text_encoders": {n: n in networks for n in ENCODER_NAMES[: 1 if s.arch == "sd15" else 2]},
    }
    if meta is not None:
        training.update(ss_epoch=meta["epoch"], ss_steps=meta["global_step"])
    training.update(network_args(s.lora))
    save_lora(
        folder / "lora.safetensors",
        tensors,
        lora_metadata(s.arch, s.lora.network_dim, s.lora.network_alpha, **training),
    )
    if meta is not None:
        (folder / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")


def network_args(lora: LoraSettings) -> dict[str, Any]:
    """`ss_network_module` / `ss_network_args` as kohya writes them: `networks.lora` (+ LoCon's
    conv_dim), or `lycoris.kohya` with `algo` (DoRA: `locon` with `dora_wd`) and its options.

    Args:
        lora: the network settings.
    """
    args: dict[str, Any] = {"conv_dim": lora.conv_dim, "conv_alpha": lora.conv_alpha} if lora.conv_dim else {}
    if lora.network_algo not in ("loha", "lokr", "dora"):
        return {"ss_network_args": args} if args else {}
    args["algo"] = "locon" if lora.network_algo == "dora" else lora.network_algo
    if lora.network_algo == "dora":
        args["dora_wd"] = True
    if lora.network_algo == "lokr":
        args.update(factor=lora.network_factor, decompose_both=lora.decompose_both)
    if lora.use_tucker:
        args["use_tucker"] = True
    return {"ss_network_module": "lycoris.kohya", "ss_network_args": args}


def states_hash(states: Mapping[str, Mapping[str, torch.Tensor]], dtype: torch.dtype) -> str:
    """xxh3-128 over component name, key, shape and bytes of every tensor, cast to `dtype` as a
    checkpoint saves it: equal weights give equal hashes, whether live or loaded from the files.

    Args:
        states: component name -> state dict.
        dtype: the save dtype.
    """
    h = xxhash.xxh3_128()
    for name in sorted(states):
        for key in sorted(states[name]):
            tensor = states[name][key].detach().to("cpu", dtype).contiguous()
            h.update(f"{name}/{key}:{tuple(tensor.shape)}\n".encode())
            h.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
