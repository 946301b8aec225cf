"""Masked loss (issue 14, item 2): masks from an image's alpha channel or its `<stem>-mask.png`,
carried through ingest, upscale and latents (at latent resolution, in the latent's entry), and
weighting the diffusion loss: at `unmasked_weight` 0, pixels outside the mask get no gradient."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from loraforge.tiny import build_tiny_sd15
from loraforge.training import losses


class Spy:
    """Wraps the tiny UNet: its prediction becomes a leaf whose gradient the test reads (the real
    forward ran; the loss's backward stops at the prediction), and may have `shift` added."""

    def __init__(self, unet: Any, shift: torch.Tensor | None = None) -> None:
        self.unet, self.shift, self.pred = unet, shift, None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        out = self.unet(*args, **kwargs)
        self.pred = out.sample.detach().requires_grad_(True)  # (B, 4, h, w)
        out.sample = self.pred
        if self.shift is not None:
            out.sample = out.sample + self.shift
        return out


@pytest.fixture(scope="module")
def tiny() -> dict[str, Any]:
    torch.manual_seed(0)
    parts = build_tiny_sd15()
    return {"unet": parts["unet"].eval(), "scheduler": parts["scheduler"]}


def half_mask() -> torch.Tensor:
    """(2, 1, 16, 16): sample 0 trains on its left half (and a soft column), sample 1 on a square."""
    mask = torch.zeros(2, 1, 16, 16)
    mask[0, :, :, :7] = 1.0
    mask[0, :, :, 7] = 0.5
    mask[1, :, 4:12, 4:12] = 1.0
    return mask


def masked_loss(tiny: dict[str, Any], spy: Spy, mask: torch.Tensor | None, **settings: Any) -> torch.Tensor:
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))  # (B, 4, h, w)
    cond = {"hidden": torch.randn(2, 77, 32, generator=torch.Generator().manual_seed(2))}  # (B, 77, D)
    gen = torch.Generator().manual_seed(3)
    s = losses.LossSettings(**settings)
    return losses.diffusion_loss(spy, tiny["scheduler"], latents, cond, gen, s, mask=mask)


def test_pixels_outside_the_mask_get_zero_gradient_at_weight_zero(tiny: dict[str, Any]) -> None:
    mask = half_mask()
    spy = Spy(tiny["unet"])
    loss = masked_loss(tiny, spy, mask, masked_loss=True, unmasked_weight=0.0)
    loss.backward()
    grad = spy.pred.grad  # (2, 4, 16, 16)
    outside = (mask == 0).expand_as(grad)
    assert torch.count_nonzero(grad[outside]) == 0, "no gradient outside the mask"
    assert (grad[~outside] != 0).float().mean() > 0.99, "inside the mask (soft column included) it trains"

    # the loss is blind to what happens outside the mask: a wrong prediction there (= another target) changes nothing
    shift = 5 * torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(4)) * (mask == 0)
    with torch.no_grad():
        shifted = masked_loss(tiny, Spy(tiny["unet"], shift), mask, masked_loss=True, unmasked_weight=0.0)
        plain = masked_loss(tiny, Spy(tiny["unet"], shift), mask, masked_loss=False)
    assert shifted.item() == pytest.approx(loss.item(), rel=1e-6)
    assert plain.item() > 2 * loss.item(), "without masked_loss the shifted pixels count"


def test_unmasked_weight_above_zero_trains_everywhere_and_one_is_no_mask(tiny: dict[str, Any]) -> None:
    mask = half_mask()
    spy = Spy(tiny["unet"])
    masked_loss(tiny, spy, mask, masked_loss=True, unmasked_weight=0.25).backward()
    grad = spy.pred.grad
    inside, outside = (mask == 1).expand_as(grad), (mask == 0).expand_as(grad)
    assert (grad[outside] != 0).float().mean() > 0.99
    # weight 0.25 outside, 1 inside: on comparable errors the gradient is smaller outside
    assert grad[outside].abs().mean() < grad[inside].abs().mean()
    with torch.no_grad():
        full = masked_loss(tiny, Spy(tiny["unet"]), mask, masked_loss=True, unmasked_weight=1.0)
        none = masked_loss(tiny, Spy(tiny["unet"]), None, masked_loss=True)
        off = masked_loss(tiny, Spy(tiny["unet"]), mask, masked_loss=False)
    assert full.item() == pytest.approx(off.item(), rel=1e-6) and none.item() == pytest.approx(off.item(), rel=1e-6)


def test_weighted_mean_formula() -> None:
    pred, target = torch.zeros(1, 2, 2, 2), torch.tensor([1.0, 2.0, 3.0, 4.0]).reshape(1, 1, 2, 2).repeat(1, 2, 1, 1)
    mask = torch.tensor([1.0, 0.5, 0.0, 0.0]).reshape(1, 1, 2, 2)
    w = losses.mask_weights(mask, 0.1)  # 1, 0.55, 0.1, 0.1
    expected = (1 * 1 + 0.55 * 4 + 0.1 * 9 + 0.1 * 16) / (1 + 0.55 + 0.1 + 0.1)
    assert losses.per_sample_loss(pred, target, "l2", 0.1, w).item() == pytest.approx(expected)
    empty = losses.per_sample_loss(pred, target, "l2", 0.1, losses.mask_weights(torch.zeros(1, 1, 2, 2), 0.0))
    assert empty.item() == 0.0  # an all-zero mask trains nothing (no NaN)
