"""Noise, timesteps and the weighted diffusion loss.

Everything random comes from the step's generator (seeded with (seed, global step)), so a
resumed run draws the same noise as the uninterrupted one. Shapes: latents (B, C, h, w),
timesteps (B,), per-sample loss and weights (B,), masks (B, 1, h, w).

Masked loss (kohya's `alpha_mask`, OneTrainer's masked training): each latent pixel's loss is
weighted by w = mask + unmasked_weight × (1 − mask), and a sample's loss is the weighted mean
Σ w·ℓ / Σ w over (C, h, w) (OneTrainer's `normalize_masked_area_loss`): the loss keeps its scale
whatever share of the image the mask covers. At `unmasked_weight` 0 pixels outside the mask get
exactly zero gradient.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class LossSettings:
    """The loss-related `finetune` params (see stages/finetune.py `Params` for what each does).

    Attributes:
        loss_type: `l2` (MSE) or `huber` (pseudo-Huber with `huber_c`).
        huber_c: pseudo-Huber threshold.
        min_snr_gamma: min-SNR-γ weighting; 0 disables.
        debiased_estimation: weight by 1/√SNR (ε) or 1/(SNR+1) (v).
        v_parameterization: train with the v-prediction target whatever the scheduler says.
        noise_offset: strength of per-channel offset noise; 0 disables.
        noise_offset_random_strength: draw the offset strength uniformly in [0, noise_offset).
        adaptive_noise_scale: adds this × |mean latent| (per channel) to the offset.
        multires_noise_iterations: pyramid noise levels; 0 disables.
        multires_noise_discount: weight of level i is discount**i.
        ip_noise_gamma: input perturbation: the noisy latents use noise + γ·ε' (target unchanged).
        masked_loss: weight the loss by each image's mask (`mask_weights`).
        unmasked_weight: the weight of pixels outside the mask (0 = ignored, 1 = no masking).
    """

    loss_type: Literal["l2", "huber"] = "l2"
    huber_c: float = 0.1
    min_snr_gamma: float = 0.0
    debiased_estimation: bool = False
    v_parameterization: bool = False
    noise_offset: float = 0.0
    noise_offset_random_strength: bool = False
    adaptive_noise_scale: float = 0.0
    multires_noise_iterations: int = 0
    multires_noise_discount: float = 0.3
    ip_noise_gamma: float = 0.0
    masked_loss: bool = False
    unmasked_weight: float = 0.0


def offset_noise(
    latents: torch.Tensor, gen: torch.Generator, strength: float, random_strength: bool, adaptive_scale: float
) -> torch.Tensor:
    """(B, C, 1, 1) per-channel constant noise: it lets the model shift overall brightness.

    Args:
        latents: (B, C, h, w) clean latents (the adaptive scale reads their per-channel mean).
        gen: the step's generator.
        strength: `noise_offset`.
        random_strength: scale the strength by U[0, 1) per step.
        adaptive_scale: add `adaptive_scale × |channel mean|` to the strength (clamped at ≥ 0).
    """
    b, c = latents.shape[:2]
    s: Any = strength * torch.rand(1, generator=gen).item() if random_strength else strength
    if adaptive_scale:
        s = (s + adaptive_scale * latents.float().mean(dim=(2, 3), keepdim=True).abs().cpu()).clamp(
            min=0
        )  # (B, C, 1, 1)
    return s * torch.randn(b, c, 1, 1, generator=gen)


def pyramid_noise(noise: torch.Tensor, gen: torch.Generator, iterations: int, discount: float) -> torch.Tensor:
    """Multires (pyramid) noise: add upsampled coarse noise at random scales, renormalise to std 1.

    Args:
        noise: (B, C, h, w) base noise on the CPU.
        gen: the step's generator.
        iterations: number of coarser levels (the 003 guide: 6-10).
        discount: level i is weighted discount**i (the guide: 0.2-0.4).
    """
    b, c, h, w = noise.shape
    for i in range(1, iterations + 1):
        r = 2 + 2 * torch.rand(1, generator=gen).item()  # scale factor in [2, 4) per level
        hn, wn = max(1, int(h / r**i)), max(1, int(w / r**i))
        coarse = torch.randn(b, c, hn, wn, generator=gen)
        noise = noise + F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False) * discount**i
        if hn == 1 or wn == 1:
            break
    return noise / noise.std()


def snr(scheduler: Any, t: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio ᾱ_t / (1 − ᾱ_t) at timesteps `t`: (B,).

    Args:
        scheduler: a DDPM-style scheduler with `alphas_cumprod`.
        t: (B,) integer timesteps.
    """
    a = scheduler.alphas_cumprod.to(t.device)[t].float()
    return a / (1 - a)


def loss_weights(snr_t: torch.Tensor, v_prediction: bool, min_snr_gamma: float, debiased: bool) -> torch.Tensor:
    """Per-sample weights (B,). min-SNR-γ (Hang et al.): min(SNR, γ)/SNR for ε, min(SNR, γ)/(SNR+1)
    for v; debiased estimation: 1/√SNR for ε, 1/(SNR+1) for v (SNR clamped at 1000).

    Args:
        snr_t: (B,) SNR at the sampled timesteps.
        v_prediction: whether the target is v.
        min_snr_gamma: γ; 0 disables.
        debiased: apply debiased estimation.
    """
    w = torch.ones_like(snr_t)
    if min_snr_gamma:
        clipped = torch.clamp(snr_t, max=min_snr_gamma)
        w = w * (clipped / (snr_t + 1) if v_prediction else clipped / snr_t)
    if debiased:
        s = torch.clamp(snr_t, max=1000)
        w = w * (1 / (s + 1) if v_prediction else 1 / torch.sqrt(s))
    return w


def mask_weights(mask: torch.Tensor, unmasked_weight: float) -> torch.Tensor:
    """Per-pixel loss weights (B, 1, h, w): mask + unmasked_weight × (1 − mask).

    Args:
        mask: (B, 1, h, w) masks in [0, 1] at latent resolution (1 = train on this pixel).
        unmasked_weight: `finetune.unmasked_weight`.
    """
    mask = mask.float()
    return mask + unmasked_weight * (1 - mask)


def per_sample_loss(
    pred: torch.Tensor, target: torch.Tensor, loss_type: str, huber_c: float, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """(B,) loss: MSE, or pseudo-Huber 2c(√((p−y)² + c²) − c), averaged over (C, h, w); with
    `weight`, the weighted mean Σ w·ℓ / Σ w (a sample whose weights are all 0 has loss 0).

    Args:
        pred: (B, C, h, w) the UNet's prediction.
        target: (B, C, h, w) the target (noise or v).
        loss_type: `l2` or `huber`.
        huber_c: pseudo-Huber threshold c.
        weight: (B, 1, h, w) per-pixel weights (`mask_weights`), shared by the channels; None = all 1.
    """
    pred, target = pred.float(), target.float()
    if loss_type == "huber":
        elem = 2 * huber_c * (torch.sqrt((pred - target) ** 2 + huber_c**2) - huber_c)
    else:
        elem = (pred - target) ** 2
    if weight is None:
        return elem.mean(dim=(1, 2, 3))
    weight = weight.to(elem.device, elem.dtype).expand_as(elem)  # (B, C, h, w)
    return (weight * elem).sum(dim=(1, 2, 3)) / weight.sum(dim=(1, 2, 3)).clamp(min=1e-8)


def make_noise(latents: torch.Tensor, gen: torch.Generator, s: LossSettings) -> torch.Tensor:
    """The step's noise (B, C, h, w) on the CPU: Gaussian, then pyramid and/or offset noise."""
    noise = torch.randn(latents.shape, generator=gen)
    if s.multires_noise_iterations:
        noise = pyramid_noise(noise, gen, s.multires_noise_iterations, s.multires_noise_discount)
    if s.noise_offset:
        noise = noise + offset_noise(
            latents, gen, s.noise_offset, s.noise_offset_random_strength, s.adaptive_noise_scale
        )
    return noise


def diffusion_loss(
    unet: Any,
    scheduler: Any,
    latents: torch.Tensor,
    cond: dict[str, Any],
    gen: torch.Generator,
    s: LossSettings,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Weighted loss between the UNet's prediction and the target for one batch (a scalar).

    Args:
        unet: the UNet (maybe wrapped by accelerate).
        scheduler: the DDPM noise scheduler of the base model.
        latents: (B, C, h, w) scaled latents on the training device.
        cond: `hidden` (B, 77, D) and, for SDXL, `added` (text_embeds, time_ids).
        gen: the step's CPU generator (all randomness of the step comes from it).
        s: loss settings.
        mask: (B, 1, h, w) masks in [0, 1]; used with `s.masked_loss` (None: unweighted, as for class images).
    """
    noise = make_noise(latents, gen, s)  # (B, C, h, w)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=gen)  # (B,)
    # input perturbation: the model sees slightly "wrong" noise but must predict the real one
    noised_with = noise + s.ip_noise_gamma * torch.randn(latents.shape, generator=gen) if s.ip_noise_gamma else noise
    return noised_loss(unet, scheduler, latents, cond, noise, noised_with, t, s, mask)


def noised_loss(
    unet: Any,
    scheduler: Any,
    latents: torch.Tensor,
    cond: dict[str, Any],
    noise: torch.Tensor,
    noised_with: torch.Tensor,
    t: torch.Tensor,
    s: LossSettings,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Weighted loss (a scalar) for given noise and timesteps: noise the latents, predict, compare
    with the target (noise or v), weigh by SNR as set (training and the validation loss share it).

    Args:
        unet: the UNet (maybe wrapped by accelerate).
        scheduler: the DDPM noise scheduler of the base model.
        latents: (B, C, h, w) scaled latents on the UNet's device.
        cond: `hidden` (B, 77, D) and, for SDXL, `added` (text_embeds, time_ids).
        noise: (B, C, h, w) the noise the target is built from (CPU or device).
        noised_with: (B, C, h, w) the noise added to the latents (= noise without input perturbation).
        t: (B,) integer timesteps.
        s: loss settings (type, Huber c, SNR weighting, v-parameterization, masked loss).
        mask: (B, 1, h, w) masks in [0, 1]; used with `s.masked_loss` (None: unweighted).
    """
    noise, noised_with, t = noise.to(latents.device), noised_with.to(latents.device), t.to(latents.device)
    noisy = scheduler.add_noise(latents, noised_with, t)
    v_pred = s.v_parameterization or scheduler.config.prediction_type == "v_prediction"
    target = scheduler.get_velocity(latents, noise, t) if v_pred else noise
    pred = unet(noisy, t, encoder_hidden_states=cond["hidden"], added_cond_kwargs=cond.get("added")).sample
    weight = mask_weights(mask, s.unmasked_weight) if s.masked_loss and mask is not None else None
    loss = per_sample_loss(pred, target, s.loss_type, s.huber_c, weight)  # (B,)
    if s.min_snr_gamma or s.debiased_estimation:
        loss = loss * loss_weights(snr(scheduler, t), v_pred, s.min_snr_gamma, s.debiased_estimation)
    return loss.mean()
