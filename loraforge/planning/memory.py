"""Will this run fit on my GPU? The memory of one training process, term by term, in bytes.

Pure arithmetic (no torch): parameter counts come in as `ParamStats` (see `loraforge.planning.model_sizes`).

    peak = persistent + max(forward, backward, step)
    persistent = weights + LoRA weights + optimizer state + EMA + DDP buckets + CUDA context
    forward  = activations + weight casts (+ gradients when gradient_accumulation > 1: they persist)
    backward = gradients + activations (+ weight casts without checkpointing)
    step     = gradients + optimizer-step temporaries

The backward phase is an upper bound: gradients fill in while activations are freed, so with one
accumulation step the real peak sits somewhat below it (by at most the activations).

- weights: every component on the device × its dtype. loraforge loads each component in float32
  and autocasts (4 B/param, master weights); the VAE is absent (latents are cached). Text encoders
  stay loaded even when their outputs are cached (`CACHED_ENCODERS_ON_DEVICE`: the trainer encodes
  cache misses with them); kohya moves them to the CPU instead (`Setup.encoders_on_device`).
- gradients: the trained parameters (the components in mode full, the LoRA matrices in mode lora)
  × their dtype.
- optimizer state per trained parameter, read off each optimizer's `step()` in the venv:
  AdamW (torch) exp_avg + exp_avg_sq (+ max_exp_avg_sq with amsgrad), each `zeros_like(p)`:
  8 B; AdamW8bit (bitsandbytes) uint8 state1/state2 + float32 absmax per 256-element block,
  2 + 8/256 B, but tensors under 4,096 elements (`min_8bit_size`) keep float32 states, 8 B;
  Lion (lion_pytorch) exp_avg, 4 B; Adafactor (transformers) factors the second moment of each
  tensor of ≥ 2 dims into rows `shape[:-1]` + columns `shape[:-2] + shape[-1:]` (a 3×3 conv
  (O, I, 3, 3) keeps 2·O·I·3 = 2/3 of its size: not negligible), 1-D tensors keep exp_avg_sq,
  + exp_avg when `beta1` is set; Prodigy (prodigyopt) exp_avg (beta1 > 0) + exp_avg_sq + `s`
  and `p0` over every `slice_p`-th element: (2 + 2/slice_p) × 4 = 16 B (an all-zero tensor, such
  as a fresh LoRA up matrix, keeps a scalar p0: a little less); DAdaptAdam
  (dadaptation) s + exp_avg + exp_avg_sq: 12 B; any other `module.Class` is taken as AdamW.
- optimizer-step temporaries: torch's AdamW on CUDA takes the foreach path, whose
  `_foreach_sqrt(exp_avg_sqs)` copies every second moment (4 B per trained param); per-tensor
  optimizers (the others, and AdamW on CPU) hold ~2 temporaries the size of the largest tensor.
- EMA: a float32 shadow of the trained parameters (`loraforge.training.ema`): 4 B.
- DDP buckets: with several processes in mode full, DDP's all-reduce buckets are a second copy of
  the gradients (accelerate leaves `gradient_as_bucket_view` off).
- activations: the UNet's at the largest bucket and the trained text encoders' (`loraforge.planning.activations`).
- weight casts: under autocast (fp16/bf16) every linear/conv casts its float32 weight to 2 bytes
  and saves the copy for backward; trained leaf weights are also kept in autocast's cast cache until
  the forward's autocast region ends. So 2 B × UNet params through forward (and backward, when the
  ops save them: without checkpointing); with checkpointing a frozen base (mode lora) keeps none.
- fused backward (`finetune.fused_backward`): each parameter steps inside backward as its
  gradient completes and drops it, so the gradients term is the largest trained tensor's, and the
  optimizer-step temporaries move into the backward phase. It steps per parameter (one optimizer
  each), so AdamW loses the foreach copy: per-tensor temporaries, as for the others.
- bf16 weights (`finetune.weights_dtype: bfloat16`, mode full): trained weights and gradients
  2 B; optimizer states stay float32 (`loraforge.training.fused` steps each parameter through a
  float32 proxy, so even `zeros_like` states are float32), the EMA too; the step adds the proxy
  and its float32 gradient (8 B × the largest tensor); no weight casts under autocast.
- CUDA context: the CUDA runtime with lazily loaded kernels, cuBLAS/cuDNN handles and workspaces,
  0.5 GiB, a typical figure on recent GPUs (nvidia-smi counts it; `torch.cuda.memory_allocated`
  does not).

`loraforge.planning.memory_plan` turns the finetune params into a `Setup`, prints the table and the verdict.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Literal, Mapping

from loraforge.planning.activations import text_activation_bytes, unet_activation_bytes
from loraforge.training.optimizers import ADAPTIVE

GIB = 2**30
CUDA_CONTEXT = GIB // 2
CACHED_ENCODERS_ON_DEVICE = True  # stages/finetune.py keeps the encoders loaded with a text cache
BNB_MIN_8BIT_SIZE = 4096  # bitsandbytes: smaller tensors keep 32-bit states
BNB_BLOCK = 256  # bitsandbytes: one float32 absmax per block, per state


@dataclass(frozen=True)
class ParamStats:
    """What the optimizers need to know of a set of parameter tensors.

    Attributes:
        numel: parameters.
        factored: Adafactor's second-moment elements (rows + columns of each ≥ 2-D tensor, all
            elements of 1-D ones).
        small: parameters in tensors under `BNB_MIN_8BIT_SIZE` elements (32-bit 8-bit-Adam states).
        largest: elements of the largest tensor (per-tensor optimizer temporaries).
    """

    numel: int = 0
    factored: int = 0
    small: int = 0
    largest: int = 0

    @classmethod
    def from_shapes(cls, shapes: Iterable[tuple[int, ...]]) -> ParamStats:
        """Stats of tensors of these shapes.

        Args:
            shapes: one shape per parameter tensor.
        """
        stats = cls()
        for shape in shapes:
            n = math.prod(shape)
            rows_cols = math.prod(shape[:-1]) + math.prod(shape[:-2]) * shape[-1] if len(shape) >= 2 else n
            stats = stats + cls(n, rows_cols, n if n < BNB_MIN_8BIT_SIZE else 0, n)
        return stats

    def __add__(self, other: ParamStats) -> ParamStats:
        return ParamStats(
            self.numel + other.numel,
            self.factored + other.factored,
            self.small + other.small,
            max(self.largest, other.largest),
        )


@dataclass(frozen=True)
class Component:
    """One weighted component of the model.

    Attributes:
        params: its parameters.
        lora: the LoRA adapters mode lora would attach to it (network_dim / conv_dim applied).
        layers: transformer layers (text encoders; activations).
        width: hidden size (text encoders; activations).
    """

    params: ParamStats
    lora: ParamStats = field(default_factory=ParamStats)
    layers: int = 0
    width: int = 0


@dataclass(frozen=True)
class Architecture:
    """A model to size: the UNet config (activations) and its components' parameters.

    Attributes:
        arch: `sd15` or `sdxl`.
        unet_config: the UNet's config.json contents.
        components: `unet`, `text_encoder` (and `text_encoder_2`) -> `Component`.
    """

    arch: str
    unet_config: Mapping[str, Any]
    components: Mapping[str, Component]


@dataclass(frozen=True)
class Setup:
    """The training settings that move memory.

    Attributes:
        mode: `full` or `lora`.
        optimizer: `finetune.optimizer`.
        optimizer_args: `finetune.optimizer_args`.
        mixed_precision: `no`, `fp16` or `bf16` (autocast: activations, not weights).
        gradient_checkpointing: recompute each resnet / transformer layer in backward.
        batch_size: images per step.
        accumulation: `finetune.gradient_accumulation` (> 1: gradients persist through forwards).
        latent: (height, width) of the largest bucket, in latent cells (pixels / 8).
        trained: the trained components (`unet`, and text encoders with an LR above 0).
        ema: an EMA of the trained weights is kept.
        text_cached: text-encoder outputs come from the cache (no encoder trained, captions fixed).
        encoders_on_device: text encoders stay on the device when their outputs are cached.
        conv_lora: mode lora adapts the 3×3 convolutions too (conv_dim > 0).
        forward_passes: UNet forwards alive at backward (2 with prior preservation's class batch).
        processes: data-parallel processes (each holds all of this).
        device: `cuda` (a CUDA context; foreach AdamW) or `cpu`.
        weight_bytes: bytes per frozen weight (4: float32).
        trained_bytes: bytes per trained weight and per gradient (4: float32 master weights), and
            per element of `zeros_like` optimizer states.
        fused_backward: `finetune.fused_backward` (mode full): no full set of gradients.
        weights_dtype: `finetune.weights_dtype` (mode full): `bfloat16` halves trained weights and gradients.
    """

    mode: Literal["full", "lora"] = "full"
    optimizer: str = "AdamW"
    optimizer_args: Mapping[str, Any] = field(default_factory=dict)
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    gradient_checkpointing: bool = False
    batch_size: int = 1
    accumulation: int = 1
    latent: tuple[int, int] = (128, 128)
    trained: tuple[str, ...] = ("unet",)
    ema: bool = False
    text_cached: bool = True
    encoders_on_device: bool = CACHED_ENCODERS_ON_DEVICE
    conv_lora: bool = False
    forward_passes: int = 1
    processes: int = 1
    device: Literal["cuda", "cpu"] = "cuda"
    weight_bytes: int = 4
    trained_bytes: int = 4
    fused_backward: bool = False
    weights_dtype: Literal["float32", "bfloat16"] = "float32"

    @property
    def held_bytes(self) -> int:
        """Bytes per trained weight and gradient as held: 2 with bf16 weights (mode full)."""
        return 2 if self.weights_dtype == "bfloat16" and self.mode == "full" else self.trained_bytes

    @property
    def per_parameter(self) -> bool:
        """One optimizer per parameter (fused backward or bf16 weights, mode full)."""
        return self.mode == "full" and (self.fused_backward or self.weights_dtype == "bfloat16")


# ---------------------------------------------------------------- optimizers


def optimizer_state_bytes(name: str, args: Mapping[str, Any], p: ParamStats, param_bytes: int) -> int:
    """Bytes of optimizer state for the trained parameters `p` (see the module docstring).

    Args:
        name: `finetune.optimizer`.
        args: `finetune.optimizer_args`.
        p: the trained parameters.
        param_bytes: bytes per trained parameter (states made by `zeros_like(p)` share its dtype).
    """
    if name == "AdamW8bit":
        big = p.numel - p.small
        return 2 * big + 2 * 4 * math.ceil(big / BNB_BLOCK) + 8 * p.small
    if name == "Lion":
        return param_bytes * p.numel
    if name == "Adafactor":  # float32 states whatever the weights: the gradient is upcast first
        return 4 * p.factored + (4 * p.numel if args.get("beta1") is not None else 0)
    if name == "Prodigy":
        beta1 = (args.get("betas") or (0.9, 0.999))[0]
        per = (beta1 > 0) + 1 + 2 / int(args.get("slice_p", 1))
        return round(per * param_bytes * p.numel)
    if name == "DAdaptAdam":
        return 3 * param_bytes * p.numel
    return (2 + bool(args.get("amsgrad"))) * param_bytes * p.numel  # AdamW, and assumed for others


def optimizer_step_bytes(name: str, args: Mapping[str, Any], p: ParamStats, param_bytes: int, device: str) -> int:
    """Bytes of temporaries inside `optimizer.step()`.

    Args:
        name: `finetune.optimizer`.
        args: `finetune.optimizer_args`.
        p: the trained parameters.
        param_bytes: bytes per trained parameter.
        device: `cuda` or `cpu` (torch's AdamW is foreach only on CUDA).
    """
    foreach = name == "AdamW" and device == "cuda" and args.get("foreach") is not False and not args.get("fused")
    return param_bytes * p.numel if foreach else 2 * 4 * p.largest


# ---------------------------------------------------------------- the estimate


PERSISTENT = ("weights", "lora weights", "optimizer state", "ema", "ddp buckets", "cuda context")


def estimate(model: Architecture, s: Setup) -> dict[str, int]:
    """Every term of the peak, in bytes, in display order (see the module docstring; `peak` combines them).

    Args:
        model: the architecture and its parameter counts.
        s: the training setup.
    """
    terms: dict[str, int] = {}
    for name, comp in model.components.items():
        on_device = name == "unet" or name in s.trained or not s.text_cached or s.encoders_on_device
        trained_here = name in s.trained and s.mode == "full"
        terms[f"weights {name}"] = comp.params.numel * (s.held_bytes if trained_here else s.weight_bytes) * on_device
    terms["weights vae"] = 0  # latents are cached: the VAE is not loaded for training
    trained = ParamStats()
    for name in s.trained:
        comp = model.components[name]
        trained = trained + (comp.lora if s.mode == "lora" else comp.params)
    terms["lora weights"] = trained.numel * s.trained_bytes if s.mode == "lora" else 0
    terms["optimizer state"] = optimizer_state_bytes(s.optimizer, s.optimizer_args, trained, s.trained_bytes)
    terms["ema"] = 4 * trained.numel if s.ema else 0
    terms["ddp buckets"] = trained.numel * s.held_bytes if s.processes > 1 and s.mode == "full" else 0
    terms["cuda context"] = CUDA_CONTEXT if s.device == "cuda" else 0
    fused = s.fused_backward and s.mode == "full"  # one parameter's gradient at a time
    terms["gradients"] = (trained.largest if fused else trained.numel) * s.held_bytes
    terms["activations"] = activation_bytes(model, s)
    terms["weight casts"] = weight_cast_bytes(model, s)
    terms["optimizer step"] = optimizer_step_bytes(s.optimizer, s.optimizer_args, trained, s.trained_bytes, s.device)
    if s.per_parameter:  # per-tensor temporaries (no foreach over all), + the float32 proxy and gradient of bf16
        terms["optimizer step"] = 2 * 4 * trained.largest + (8 * trained.largest if s.held_bytes == 2 else 0)
    return terms


def activation_bytes(model: Architecture, s: Setup) -> int:
    """The UNet's activations at the largest bucket plus the trained text encoders' (`loraforge.planning.activations`).

    Args:
        model: the architecture.
        s: the training setup.
    """
    total = unet_activation_bytes(
        model.unet_config,
        s.latent,
        s.batch_size,
        half=s.mixed_precision != "no",
        checkpointing=s.gradient_checkpointing,
        frozen_convs=s.mode == "lora" and not s.conv_lora,
        passes=s.forward_passes,
    )
    for name in s.trained:
        if name != "unet":
            comp = model.components[name]
            total += text_activation_bytes(
                comp.layers, comp.width, s.batch_size, s.gradient_checkpointing, s.forward_passes
            )
    return total


def weight_cast_bytes(model: Architecture, s: Setup) -> int:
    """The 2-byte weight copies autocast makes for the UNet's linears and convs (module docstring):
    none without autocast, for weights already held in 2 bytes, or for a checkpointed frozen base.

    Args:
        model: the architecture.
        s: the training setup.
    """
    held = s.held_bytes if s.mode == "full" else s.weight_bytes
    if s.mixed_precision == "no" or held <= 2 or (s.gradient_checkpointing and s.mode == "lora"):
        return 0
    return 2 * model.components["unet"].params.numel


def phases(terms: Mapping[str, int], s: Setup) -> dict[str, int]:
    """Bytes alive over the persistent terms in each phase of a step (module docstring).

    Args:
        terms: from `estimate`.
        s: the training setup (checkpointing, accumulation).
    """
    grads, acts, casts, step = terms["gradients"], terms["activations"], terms["weight casts"], terms["optimizer step"]
    fused = s.fused_backward and s.mode == "full"  # the steps run inside backward
    return {
        "forward": acts + casts + (grads if s.accumulation > 1 else 0),
        "backward": grads + acts + (0 if s.gradient_checkpointing else casts) + (step if fused else 0),
        "step": 0 if fused else grads + step,
    }


def peak(terms: Mapping[str, int], s: Setup) -> int:
    """The peak of an `estimate`: the persistent terms plus the largest phase.

    Args:
        terms: from `estimate`.
        s: the training setup.
    """
    persistent = sum(v for k, v in terms.items() if k.startswith(PERSISTENT))
    return persistent + max(phases(terms, s).values())


def savings(model: Architecture, s: Setup) -> list[tuple[str, int]]:
    """The settings that would lower the peak, each with its saving in bytes, largest first.

    Args:
        model: the architecture.
        s: the training setup.
    """
    r = dataclasses.replace
    options = {
        "gradient checkpointing": r(s, gradient_checkpointing=True),
        "AdamW8bit": r(s, optimizer="AdamW8bit", optimizer_args={}),
        "Adafactor": r(s, optimizer="Adafactor", optimizer_args={}),
        "cached text-encoder outputs": r(s, trained=("unet",), text_cached=True),
        "bf16 mixed precision": r(s, mixed_precision="bf16"),
        "batch size 1": r(s, batch_size=1),
        "no EMA": r(s, ema=False),
        "mode: lora": r(s, mode="lora"),
    }
    if s.mode == "full" and s.processes == 1 and s.optimizer not in ADAPTIVE:  # what the trainer runs
        if s.accumulation == 1 and s.mixed_precision != "fp16":
            options["fused backward"] = r(s, fused_backward=True)
        label = "bf16 weights" if s.mixed_precision == "bf16" else "bf16 weights + bf16 autocast"  # it needs both
        options[label] = r(s, weights_dtype="bfloat16", mixed_precision="bf16")
    base = peak(estimate(model, s), s)
    found = [(label, base - peak(estimate(model, alt), alt)) for label, alt in options.items()]
    return sorted(((label, saved) for label, saved in found if saved > 0), key=lambda x: -x[1])


def combined(model: Architecture, s: Setup) -> int:
    """The peak with every saver that keeps the run what it is (checkpointing, the leaner of
    AdamW8bit / Adafactor, cached text-encoder outputs, bf16); batch, EMA and mode untouched.

    Args:
        model: the architecture.
        s: the training setup.
    """
    lean = dataclasses.replace(
        s, gradient_checkpointing=True, trained=("unet",), text_cached=True, mixed_precision="bf16"
    )
    options = [lean] + [dataclasses.replace(lean, optimizer=o, optimizer_args={}) for o in ("AdamW8bit", "Adafactor")]
    return min(peak(estimate(model, o), o) for o in options)
