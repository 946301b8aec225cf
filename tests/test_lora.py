"""LoRA math and kohya-format files: SVD extraction, resizing, file round trips, and loading the
files into real (tiny) diffusers SD1.5 and SDXL pipelines with `load_lora_weights`."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest


import torch

from loraforge.lora import format as L
from loraforge.lora import resize as lora_resize
from loraforge.lora import svd as lora_svd
from loraforge.models import tiny
from loraforge.models.kohya_names import kohya_name, kohya_names, text_encoder_targets, unet_targets
from tests.helpers import captured_messages

ARCHS = ["tiny-sd15", "tiny-sdxl"]
# Text encoders of each builtin and their kohya prefixes.
TEXT_ENCODERS = {
    "tiny-sd15": {"text_encoder": "lora_te"},
    "tiny-sdxl": {"text_encoder": "lora_te1", "text_encoder_2": "lora_te2"},
}
FULL_RANK = 10_000  # more than any tiny layer's width: extraction is exact


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _low_rank(out_dim: int, in_dim: int, singular_values: list[float], seed: int = 0) -> torch.Tensor:
    """A (out, in) matrix with exactly the given singular values."""
    g = _gen(seed)
    k = len(singular_values)
    u, _ = torch.linalg.qr(torch.randn(out_dim, k, generator=g))  # (out, k) orthonormal columns
    v, _ = torch.linalg.qr(torch.randn(in_dim, k, generator=g))  # (in, k)
    return u @ torch.diag(torch.tensor(singular_values)) @ v.T


# --------------------------------------------------------------------------------------------
# extract_layer
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(24, 40), (40, 24)])
def test_extract_layer_full_rank_reproduces_delta(shape: tuple[int, int]) -> None:
    delta = torch.randn(*shape, generator=_gen(0))
    up, down = lora_svd.extract_layer(delta, rank=min(shape), clamp_quantile=1.0)
    assert up.shape == (shape[0], min(shape)) and down.shape == (min(shape), shape[1])
    torch.testing.assert_close(up @ down, delta, atol=1e-5, rtol=1e-5)


def test_extract_layer_caps_rank_at_layer_size() -> None:
    delta = torch.randn(8, 5, generator=_gen(1))
    up, down = lora_svd.extract_layer(delta, rank=64)
    assert up.shape == (8, 5) and down.shape == (5, 5)
    torch.testing.assert_close(up @ down, delta, atol=1e-5, rtol=1e-5)


def test_extract_layer_error_falls_as_rank_rises() -> None:
    delta = torch.randn(48, 32, generator=_gen(2))
    errors = [float((torch.matmul(*lora_svd.extract_layer(delta, r)) - delta).norm()) for r in (1, 4, 8, 16, 32)]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-4 * float(delta.norm())


def test_extract_layer_truncation_is_the_best_low_rank_fit() -> None:
    # Eckart–Young: the rank-r error is the norm of the dropped singular values.
    delta = _low_rank(30, 20, [5.0, 4.0, 3.0, 2.0, 1.0])
    up, down = lora_svd.extract_layer(delta, rank=3)
    assert float((up @ down - delta).norm()) == pytest.approx(math.sqrt(2.0**2 + 1.0**2), rel=1e-4)


def test_extract_layer_clamp_caps_values() -> None:
    delta = torch.randn(64, 48, generator=_gen(3))
    delta[0, 0] = 1000.0  # an outlier
    up, down = lora_svd.extract_layer(delta, rank=8, clamp_quantile=0.9)
    free_up, free_down = lora_svd.extract_layer(delta, rank=8, clamp_quantile=1.0)
    joint = torch.cat([free_up.flatten(), free_down.flatten()]).abs()
    limit = float(torch.quantile(joint, 0.9))
    assert float(up.abs().max()) <= limit + 1e-5 and float(down.abs().max()) <= limit + 1e-5
    assert float(free_up.abs().max()) > limit  # clamping did something
    # entries below the limit are untouched
    small = free_down.abs() < limit
    torch.testing.assert_close(down[small], free_down[small])


@pytest.mark.parametrize("kernel", [3, 1])
def test_extract_layer_conv_shapes_round_trip(kernel: int) -> None:
    delta = torch.randn(16, 8, kernel, kernel, generator=_gen(4))  # (out, in, kh, kw)
    in_flat = 8 * kernel * kernel
    rank = min(16, in_flat)
    up, down = lora_svd.extract_layer(delta, rank=100)
    assert up.shape == (16, rank, 1, 1) and down.shape == (rank, 8, kernel, kernel)
    torch.testing.assert_close(L.merge_layer(up, down, alpha=rank), delta, atol=1e-5, rtol=1e-5)
    # ... and as the convolution a loader builds from them: a k×k conv to `rank` channels, then 1×1.
    x = torch.randn(2, 8, 6, 6, generator=_gen(5))
    lora_out = torch.nn.functional.conv2d(torch.nn.functional.conv2d(x, down, padding=kernel // 2), up)
    full_out = torch.nn.functional.conv2d(x, delta, padding=kernel // 2)
    torch.testing.assert_close(lora_out, full_out, atol=1e-4, rtol=1e-4)


def test_extract_layer_rejects_bad_arguments() -> None:
    delta = torch.randn(4, 4)
    with pytest.raises(ValueError, match="`rank`"):
        lora_svd.extract_layer(delta, rank=0)
    with pytest.raises(ValueError, match="`clamp_quantile`"):
        lora_svd.extract_layer(delta, rank=2, clamp_quantile=0.0)
    with pytest.raises(ValueError, match="2-D or 4-D"):
        lora_svd.extract_layer(torch.randn(4), rank=2)


def test_abs_quantile_matches_torch_quantile() -> None:
    values = torch.randn(1001, generator=_gen(6))
    for q in (0.0, 0.5, 0.99, 1.0):
        expected = float(torch.quantile(values.abs(), q))
        assert float(lora_svd._abs_quantile(values, q)) == pytest.approx(expected, rel=1e-6)


# --------------------------------------------------------------------------------------------
# Targets and names
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def components() -> dict[str, dict[str, Any]]:
    """Seeded tiny components of both builtins (built once for the module)."""
    return {name: tiny.BUILTINS[name](0) for name in ARCHS}


def test_unet_targets_sd15(components: dict[str, dict[str, Any]]) -> None:
    keys = list(components["tiny-sd15"]["unet"].state_dict())
    attention = unet_targets(keys, conv=False)
    assert "down_blocks.0.attentions.0.proj_in" in attention
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_out.0" in attention
    assert "up_blocks.1.attentions.2.transformer_blocks.0.ff.net.0.proj" in attention
    assert "mid_block.attentions.0.transformer_blocks.0.ff.net.2" in attention
    assert not any("norm" in m or "resnets" in m or "conv" in m for m in attention)
    n_transformers = len({m.split(".transformer_blocks")[0].split(".proj_")[0] for m in attention})
    assert len(attention) == n_transformers * (2 + 10)  # proj_in/out + (q, k, v, out) × 2 + ff × 2
    with_conv = unet_targets(keys, conv=True)
    extra = sorted(set(with_conv) - set(attention))
    assert "down_blocks.0.resnets.0.conv1" in extra and "up_blocks.0.resnets.2.conv2" in extra
    assert "down_blocks.0.downsamplers.0.conv" in extra and "up_blocks.0.upsamplers.0.conv" in extra
    assert "mid_block.resnets.1.time_emb_proj" in extra and "down_blocks.1.resnets.0.conv_shortcut" in extra
    assert "conv_in" not in with_conv and "conv_out" not in with_conv and "time_embedding.linear_1" not in with_conv
    assert with_conv == sorted(with_conv)


def test_unet_targets_sdxl_linear_projection(components: dict[str, dict[str, Any]]) -> None:
    unet = components["tiny-sdxl"]["unet"]
    state = unet.state_dict()
    attention = unet_targets(state, conv=False)
    assert "down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_q" in attention  # 2 layers per block
    assert not any(m.startswith("add_embedding") for m in unet_targets(state, conv=True))
    modules = dict(unet.named_modules())
    for module in attention:
        assert isinstance(modules[module], torch.nn.Linear), module


def test_text_encoder_targets_both_clip_layouts(components: dict[str, dict[str, Any]]) -> None:
    sdxl = components["tiny-sdxl"]
    for encoder, prefix in TEXT_ENCODERS["tiny-sdxl"].items():
        keys = list(sdxl[encoder].state_dict())
        targets = text_encoder_targets(keys)
        assert len(targets) == 2 * 6  # 2 layers × q, k, v, out, fc1, fc2
        assert all(f"{t}.weight" in keys for t in targets)  # spelled as in the model
        names = kohya_names(prefix, targets)
        assert f"{prefix}_text_model_encoder_layers_0_self_attn_q_proj" in names.values()
        assert f"{prefix}_text_model_encoder_layers_1_mlp_fc2" in names.values()
    assert text_encoder_targets(["text_projection.weight", "text_model.final_layer_norm.weight"]) == []


def test_kohya_name() -> None:
    module = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    assert kohya_name("lora_unet", module) == "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    assert kohya_name("lora_te", "encoder.layers.0.mlp.fc1") == "lora_te_text_model_encoder_layers_0_mlp_fc1"
    te2 = kohya_name("lora_te2", "text_model.encoder.layers.0.mlp.fc1")
    assert te2 == "lora_te2_text_model_encoder_layers_0_mlp_fc1"
    with pytest.raises(ValueError, match="`prefix`"):
        kohya_name("lora_vae", module)
    with pytest.raises(ValueError, match="`module`"):
        kohya_name("lora_unet", module + ".weight")


def test_text_encoder_changed() -> None:
    assert lora_svd.text_encoder_changed(0.02, min_diff=0.01)
    assert not lora_svd.text_encoder_changed(0.005, min_diff=0.01)
    assert not lora_svd.text_encoder_changed(0.0, min_diff=0.0)  # an untouched encoder is never kept
    with pytest.raises(ValueError, match="`min_diff`"):
        lora_svd.text_encoder_changed(1.0, min_diff=-1.0)


def test_max_abs_delta_streams_from_getters() -> None:
    base = {"a.weight": torch.zeros(3, 3), "b.weight": torch.zeros(2)}
    tuned = {"a.weight": torch.full((3, 3), -0.5), "b.weight": torch.tensor([0.1, 0.2])}
    assert lora_svd.max_abs_delta(base.__getitem__, tuned.__getitem__, ["a.weight", "b.weight"]) == pytest.approx(0.5)


# --------------------------------------------------------------------------------------------
# extract_lora on state dicts
# --------------------------------------------------------------------------------------------


def test_extract_lora_ranks_alpha_and_dtype() -> None:
    base = {
        "lin.weight": torch.randn(16, 12, generator=_gen(7)),
        "conv.weight": torch.randn(8, 4, 3, 3, generator=_gen(8)),
    }
    tuned = {k: v + 0.1 * torch.randn(v.shape, generator=_gen(9)) for k, v in base.items()}
    targets = {"lin": "lora_unet_lin", "conv": "lora_unet_conv"}
    seen: dict[str, dict[str, float]] = {}
    lora = lora_svd.extract_lora(
        base,
        lambda k: tuned[k],  # a getter, as when streaming from safetensors
        targets,
        dim=4,
        conv_dim=2,
        dtype=torch.float16,
        on_layer=lambda n, s: seen.update({n: s}),
    )
    assert sorted(lora) == sorted(f"lora_unet_{m}{s}" for m in targets for s in (L.DOWN, L.UP, L.ALPHA))
    assert lora["lora_unet_lin.lora_down.weight"].shape == (4, 12)
    assert lora["lora_unet_conv.lora_down.weight"].shape == (2, 4, 3, 3)
    assert lora["lora_unet_conv.lora_up.weight"].shape == (8, 2, 1, 1)
    assert lora["lora_unet_lin.lora_up.weight"].dtype == torch.float16
    # one alpha (= dim) for the file, float32 scalars
    alphas = [v for k, v in lora.items() if k.endswith(L.ALPHA)]
    assert all(v.dtype == torch.float32 and v.dim() == 0 and float(v) == 4.0 for v in alphas)
    assert seen["lora_unet_conv"]["rank"] == 2
    # the share of the conv delta's Frobenius norm its top 2 singular values hold
    sv = torch.linalg.svdvals((tuned["conv.weight"] - base["conv.weight"]).flatten(1).double())
    kept = math.sqrt(float(sv[:2].pow(2).sum() / sv.pow(2).sum()))
    assert seen["lora_unet_conv"]["fro_retained"] == pytest.approx(kept, rel=1e-5)
    # the conv layer (rank 2, alpha 4) still applies its own rank-2 truncation at weight 1
    up, down = lora_svd.extract_layer(tuned["conv.weight"] - base["conv.weight"], 2)
    applied = L.merge_layer(lora["lora_unet_conv.lora_up.weight"], lora["lora_unet_conv.lora_down.weight"], 4.0)
    torch.testing.assert_close(applied, L.merge_layer(up, down, 2.0), atol=2e-3, rtol=2e-3)


def test_extract_lora_refuses_kxk_conv_without_conv_dim() -> None:
    state = {"conv.weight": torch.randn(4, 4, 3, 3)}
    with pytest.raises(ValueError, match="`conv_dim`"):
        lora_svd.extract_lora(state, state, {"conv": "lora_unet_conv"}, dim=4, conv_dim=0)
    with pytest.raises(ValueError, match="`dim`"):
        lora_svd.extract_lora(state, state, {"conv": "lora_unet_conv"}, dim=0, conv_dim=4)


# --------------------------------------------------------------------------------------------
# Resizing
# --------------------------------------------------------------------------------------------


def _lora_layer(singular_values: list[float], out_dim: int = 24, in_dim: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    up, down = lora_svd.extract_layer(_low_rank(out_dim, in_dim, singular_values), rank=len(singular_values))
    return up, down


def test_resize_to_own_rank_is_lossless() -> None:
    up, down = _lora_layer([6.0, 5.0, 4.0, 3.0, 2.0, 1.0])
    before = L.merge_layer(up, down, alpha=3.0)  # alpha ≠ rank: scale 0.5 must be kept
    new_up, new_down, new_alpha, stats = lora_resize.resize_layer(up, down, alpha=3.0, rank=6)
    assert stats["rank"] == 6 and new_alpha == 6.0 and stats["fro_retained"] == pytest.approx(1.0)
    torch.testing.assert_close(L.merge_layer(new_up, new_down, new_alpha), before, atol=1e-5, rtol=1e-5)


def test_resize_to_smaller_rank_keeps_the_top_singular_values() -> None:
    S = [6.0, 5.0, 4.0, 3.0, 2.0, 1.0]
    up, down = _lora_layer(S)
    new_up, new_down, new_alpha, stats = lora_resize.resize_layer(up, down, alpha=6.0, rank=2, new_alpha=1.0)
    assert new_up.shape == (24, 2) and new_down.shape == (2, 20) and new_alpha == 1.0
    assert stats["fro_retained"] == pytest.approx(math.sqrt((36 + 25) / sum(s * s for s in S)), rel=1e-5)
    assert stats["fro_retained"] <= 1.0
    assert stats["sv_ratio_max_min"] == pytest.approx(6.0 / 5.0, rel=1e-5)
    kept = L.merge_layer(new_up, new_down, new_alpha)
    residual = L.merge_layer(up, down, 6.0) - kept
    assert float(residual.norm()) == pytest.approx(math.sqrt(16 + 9 + 4 + 1), rel=1e-4)


@pytest.mark.parametrize(
    ("method", "param", "expected"),
    [
        # S = 8, 4, 2, 1, 0.5: share of sum 0.516, 0.774, 0.903, 0.968, 1
        ("sv_cumulative", 0.9, 3),
        ("sv_cumulative", 12 / 15.5, 2),  # a target met exactly is met
        ("sv_cumulative", 1.0, 5),
        # Frobenius share sqrt(cumsum S² / 85.25): 0.866, 0.968, 0.993, 0.999, 1
        ("sv_fro", 0.95, 2),
        ("sv_fro", 0.99, 3),
        # keep S ≥ 8 / param
        ("sv_ratio", 4.0, 3),  # 2.0 ≥ 8 / 4 exactly
        ("sv_ratio", 3.9, 2),
        ("sv_ratio", 100.0, 5),
    ],
)
def test_dynamic_resize_picks_the_smallest_rank_meeting_the_target(method: str, param: float, expected: int) -> None:
    up, down = _lora_layer([8.0, 4.0, 2.0, 1.0, 0.5])
    _, new_down, _, stats = lora_resize.resize_layer(up, down, 5.0, rank=16, method=method, param=param)  # type: ignore[arg-type]
    assert stats["rank"] == expected and new_down.shape[0] == expected


def test_dynamic_resize_is_capped_by_rank() -> None:
    up, down = _lora_layer([8.0, 4.0, 2.0, 1.0, 0.5])
    assert lora_resize.resize_layer(up, down, 5.0, rank=2, method="sv_cumulative", param=1.0)[3]["rank"] == 2


def test_resize_never_exceeds_the_layers_own_rank() -> None:
    # a rank-4 LoRA asked for rank 8: kohya crashes here; we keep rank 4
    up, down = _lora_layer([4.0, 3.0, 2.0, 1.0])
    new_up, new_down, new_alpha, stats = lora_resize.resize_layer(up, down, alpha=4.0, rank=8)
    assert stats["rank"] == 4 and new_up.shape == (24, 4) and new_alpha == 4.0
    # a layer narrower than its LoRA rank: (3, 100) weight, rank-8 factors
    up = torch.randn(3, 8, generator=_gen(10))
    down = torch.randn(8, 100, generator=_gen(11))
    new_up, new_down, new_alpha, stats = lora_resize.resize_layer(up, down, alpha=8.0, rank=8)
    assert stats["rank"] == 3 and new_down.shape == (3, 100)
    torch.testing.assert_close(L.merge_layer(new_up, new_down, new_alpha), up @ down, atol=1e-4, rtol=1e-4)


def test_resize_conv_layer() -> None:
    delta = torch.randn(16, 8, 3, 3, generator=_gen(12))
    up, down = lora_svd.extract_layer(delta, rank=16)
    new_up, new_down, new_alpha, stats = lora_resize.resize_layer(up, down, alpha=16.0, rank=4)
    assert new_up.shape == (16, 4, 1, 1) and new_down.shape == (4, 8, 3, 3)
    best_up, best_down = lora_svd.extract_layer(delta, rank=4)
    best = L.merge_layer(best_up, best_down, alpha=4.0)  # the best rank-4 fit of the delta
    torch.testing.assert_close(L.merge_layer(new_up, new_down, new_alpha), best, atol=1e-4, rtol=1e-4)


def test_resize_zero_layer_keeps_one_zero_component() -> None:
    up, down = torch.zeros(6, 4), torch.zeros(4, 5)
    new_up, new_down, _, stats = lora_resize.resize_layer(up, down, alpha=4.0, rank=2, method="sv_fro", param=0.9)
    assert stats["rank"] == 1 and float(new_up.abs().sum()) == 0.0


def test_resize_rejects_bad_arguments() -> None:
    up, down = _lora_layer([2.0, 1.0])
    with pytest.raises(ValueError, match="`rank`"):
        lora_resize.resize_layer(up, down, 2.0, rank=0)
    with pytest.raises(ValueError, match="`method`"):
        lora_resize.resize_layer(up, down, 2.0, rank=2, method="sv_magic")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`param`.*sv_ratio"):
        lora_resize.resize_layer(up, down, 2.0, rank=2, method="sv_ratio", param=0.5)
    with pytest.raises(ValueError, match="`param`.*sv_fro"):
        lora_resize.resize_layer(up, down, 2.0, rank=2, method="sv_fro", param=None)


def test_resize_lora_gives_every_layer_one_alpha() -> None:
    tensors: dict[str, torch.Tensor] = {}
    for i, S in enumerate([[5.0, 1.0, 0.01, 0.001], [3.0, 2.9, 2.8, 2.7]]):
        up, down = _lora_layer(S)
        name = f"lora_unet_l{i}"
        tensors |= {name + L.UP: up.half(), name + L.DOWN: down.half(), name + L.ALPHA: torch.tensor(4.0)}
    resized, stats = lora_resize.resize_lora(tensors, rank=4, method="sv_fro", param=0.98)  # sqrt(25/26) = 0.981
    assert stats["lora_unet_l0"]["rank"] == 1 and stats["lora_unet_l1"]["rank"] == 4
    assert {float(v) for k, v in resized.items() if k.endswith(L.ALPHA)} == {4.0}
    assert resized["lora_unet_l0.lora_up.weight"].dtype == torch.float16
    for i in (0, 1):
        name = f"lora_unet_l{i}"
        before = L.merge_layer(tensors[name + L.UP], tensors[name + L.DOWN], 4.0)
        after = L.merge_layer(resized[name + L.UP], resized[name + L.DOWN], 4.0)
        dropped = math.sqrt(1 - stats[name]["fro_retained"] ** 2)  # share of the norm left out
        assert float((after - before).norm() / before.norm()) == pytest.approx(dropped, abs=2e-3)
    with pytest.raises(ValueError, match="not a plain LoRA key"):
        lora_resize.resize_lora({"lora_unet_x.hada_w1_a": torch.zeros(1)}, rank=1)


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def test_lora_metadata() -> None:
    meta = L.lora_metadata("sdxl", 8, 8.0, ss_learning_rate=1e-6, ss_tag_frequency={"img": {"cat": 2}})
    assert meta["ss_network_module"] == "networks.lora"
    assert meta["ss_network_dim"] == "8" and meta["ss_network_alpha"] == "8.0"
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta["ss_v2"] == "False"
    assert meta["ss_learning_rate"] == "1e-06" and meta["ss_tag_frequency"] == '{"img": {"cat": 2}}'
    assert L.lora_metadata("sd15", "Dynamic", "Dynamic")["ss_base_model_version"] == "sd_v1"
    with pytest.raises(ValueError, match="`arch`"):
        L.lora_metadata("sd3", 8, 8)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`lr`"):
        L.lora_metadata("sd15", 8, 8, lr=1.0)


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    tensors = {
        "lora_unet_a.lora_up.weight": torch.randn(4, 8).T,  # (8, 4), not contiguous
        "lora_unet_a.lora_down.weight": torch.randn(4, 6).half(),
        "lora_unet_a.alpha": torch.tensor(4.0),
    }
    path = L.save_lora(tmp_path / "sub" / "x.safetensors", tensors, L.lora_metadata("sd15", 4, 4))
    loaded, meta = L.load_lora(path)
    assert meta["ss_network_dim"] == "4" and sorted(loaded) == sorted(tensors)
    for key, value in tensors.items():
        assert loaded[key].dtype == value.dtype and torch.equal(loaded[key], value)
    assert [p.name for p in path.parent.iterdir()] == ["x.safetensors"]  # no temp file left
    with pytest.raises(TypeError, match="`metadata`"):
        L.save_lora(tmp_path / "y.safetensors", tensors, {"ss_network_dim": 4})  # type: ignore[dict-item]
    assert not (tmp_path / "y.safetensors").exists()


# --------------------------------------------------------------------------------------------
# Tiny SD1.5 and SDXL: extract, apply, and load into diffusers
# --------------------------------------------------------------------------------------------


def _targets(name: str, state: dict[str, dict[str, torch.Tensor]]) -> dict[str, dict[str, str]]:
    """Component → (module → kohya name) for every LoRA-carrying component of builtin `name`,
    named as kohya does (SDXL UNet: sgm names)."""
    arch = tiny.BUILTIN_ARCH[name]
    return {c: L.lora_targets(arch, c, state[c], conv=True) for c in ["unet", *TEXT_ENCODERS[name]]}  # type: ignore[arg-type]


def _finetuned(state: dict[str, torch.Tensor], modules: list[str], seed: int) -> dict[str, torch.Tensor]:
    """`state` with every targeted weight moved by 20% of its own scale (a simulated finetune)."""
    g = _gen(seed)
    tuned = dict(state)
    for module in modules:
        w = state[f"{module}.weight"]
        tuned[f"{module}.weight"] = w + 0.2 * w.std() * torch.randn(w.shape, generator=g)
    return tuned


class Case:
    """One builtin: base and tuned state dicts per component, targets and the extracted LoRA."""

    def __init__(self, name: str) -> None:
        self.name = name
        base_pipe = tiny.build_pipeline(name)
        self.components = ["unet", *TEXT_ENCODERS[name]]
        self.base = {c: {k: v.clone() for k, v in getattr(base_pipe, c).state_dict().items()} for c in self.components}
        self.targets = _targets(name, self.base)
        self.tuned = {c: _finetuned(self.base[c], list(self.targets[c]), seed=i) for i, c in enumerate(self.components)}
        self.lora: dict[str, torch.Tensor] = {}
        for c in self.components:
            self.lora |= lora_svd.extract_lora(
                self.base[c], self.tuned[c].__getitem__, self.targets[c], dim=FULL_RANK, conv_dim=FULL_RANK
            )


@pytest.fixture(scope="module", params=ARCHS)
def case(request: pytest.FixtureRequest) -> Case:
    return Case(request.param)


def test_kohya_keys_look_right(case: Case) -> None:
    prefixes = {"lora_unet"} | set(TEXT_ENCODERS[case.name].values())
    names = L.lora_layers(case.lora)
    assert {n.split("_text_model_")[0] if "_text_model_" in n else n[: len("lora_unet")] for n in names} == prefixes
    assert len(names) == sum(len(t) for t in case.targets.values())
    for name in names:
        assert name.replace("_", "").isalnum() and "." not in name
        assert {name + L.DOWN, name + L.UP, name + L.ALPHA} <= set(case.lora)
    if case.name == "tiny-sd15":
        assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj" in names
        assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" in names
    else:
        assert "lora_te1_text_model_encoder_layers_1_mlp_fc1" in names
        assert "lora_te2_text_model_encoder_layers_0_self_attn_out_proj" in names
        # sgm names: down_blocks.1.attentions.1 is input_blocks.(1 + 1·3 + 1).1
        assert "lora_unet_input_blocks_5_1_transformer_blocks_1_attn2_to_v" in names
        assert "lora_unet_input_blocks_3_0_op" in names and "lora_unet_output_blocks_2_2_conv" in names
        assert "lora_unet_middle_block_1_proj_in" in names and "lora_unet_middle_block_2_emb_layers_1" in names
        assert not any(
            n.startswith(("lora_unet_down_blocks", "lora_unet_up_blocks", "lora_unet_mid_block")) for n in names
        )


def test_full_rank_lora_applied_to_base_gives_tuned(case: Case) -> None:
    for c in case.components:
        merged = L.apply_lora(case.base[c], case.lora, case.targets[c], scale=1.0)
        assert merged.keys() == case.base[c].keys()
        for key, tuned in case.tuned[c].items():
            torch.testing.assert_close(merged[key], tuned, atol=1e-5, rtol=1e-4, msg=f"{c}: {key}")
        unchanged = L.apply_lora(case.base[c], case.lora, case.targets[c], scale=0.0)
        assert all(torch.equal(unchanged[k], v) for k, v in case.base[c].items())


def _images(pipe: Any) -> torch.Tensor:
    out = pipe("a photo of a cat", num_inference_steps=2, height=64, width=64, generator=_gen(0), output_type="pt")
    return out.images  # (1, 3, 64, 64) in [0, 1]


def _pipeline_with(name: str, state: dict[str, dict[str, torch.Tensor]]) -> Any:
    pipe = tiny.build_pipeline(name)
    for c, sd in state.items():
        getattr(pipe, c).load_state_dict(sd)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_diffusers_loads_the_kohya_file(case: Case, tmp_path: Path) -> None:
    arch = tiny.BUILTIN_ARCH[case.name]
    metadata = L.lora_metadata(arch, FULL_RANK, FULL_RANK)  # type: ignore[arg-type]
    path = L.save_lora(tmp_path / "lora.safetensors", case.lora, metadata)
    pipe = _pipeline_with(case.name, case.base)
    base_images = _images(pipe)

    with captured_messages() as messages:
        pipe.load_lora_weights(path, adapter_name="style")
    bad_words = ("unexpected", "missing", "not match", "no lora keys", "ignored", "not been correctly")
    problems = [m for m in messages if any(w in m.lower() for w in bad_words)]
    assert problems == []

    # every targeted module of every component got a LoRA layer
    from peft.tuners.tuners_utils import BaseTunerLayer

    for c in case.components:
        wrapped = {n for n, m in getattr(pipe, c).named_modules() if isinstance(m, BaseTunerLayer)}
        assert wrapped == set(case.targets[c]), c

    # weight 1: the base pipeline plus the full-rank LoRA is the finetuned pipeline
    tuned_images = _images(_pipeline_with(case.name, case.tuned))
    lora_images = _images(pipe)
    assert float((tuned_images - base_images).abs().max()) > 1e-2  # the finetune shows
    torch.testing.assert_close(lora_images, tuned_images, atol=2e-3, rtol=0)

    # weight 0 (UNet and text encoders alike): exactly the base pipeline
    pipe.set_adapters(["style"], adapter_weights=[0.0])
    assert torch.equal(_images(pipe), base_images)


def test_diffusers_applies_a_resized_lora_like_apply_lora(case: Case, tmp_path: Path) -> None:
    # A dynamic resize gives layers different ranks; diffusers must still scale each one right.
    resized, stats = lora_resize.resize_lora(case.lora, rank=8, method="sv_fro", param=0.6)
    assert len({s["rank"] for s in stats.values()}) > 1
    metadata = L.lora_metadata(tiny.BUILTIN_ARCH[case.name], "Dynamic", 8.0)  # type: ignore[arg-type]
    path = L.save_lora(tmp_path / "small.safetensors", resized, metadata)
    merged = {c: L.apply_lora(case.base[c], resized, case.targets[c], scale=0.5) for c in case.components}

    pipe = _pipeline_with(case.name, case.base)
    with captured_messages() as messages:
        pipe.load_lora_weights(path, adapter_name="style")
    assert [m for m in messages if "ignored" in m or "not match" in m] == []
    pipe.set_adapters(["style"], adapter_weights=[0.5])
    torch.testing.assert_close(_images(pipe), _images(_pipeline_with(case.name, merged)), atol=2e-3, rtol=0)


def test_extract_lora_streams_from_safetensors(tmp_path: Path) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    base = {
        "a.weight": torch.randn(12, 10, generator=_gen(13)),  # Linear (out, in)
        "b.weight": torch.randn(6, 3, 3, 3, generator=_gen(14)),  # 3×3 conv (out, in, kh, kw)
    }
    tuned = {k: v + torch.randn(v.shape, generator=_gen(15)) for k, v in base.items()}
    save_file(base, tmp_path / "base.safetensors")
    save_file(tuned, tmp_path / "tuned.safetensors")
    targets = {"a": "lora_unet_a", "b": "lora_unet_b"}
    expected = lora_svd.extract_lora(base, tuned, targets, dim=4, conv_dim=2)
    with (
        safe_open(tmp_path / "base.safetensors", framework="pt") as fb,
        safe_open(tmp_path / "tuned.safetensors", framework="pt") as ft,
    ):
        streamed = lora_svd.extract_lora(fb.get_tensor, ft.get_tensor, targets, dim=4, conv_dim=2)
    assert streamed.keys() == expected.keys()
    assert all(torch.equal(streamed[k], v) for k, v in expected.items())


# --------------------------------------------------------------------------------------------
# Names by architecture, ModelSpec, hashes
# --------------------------------------------------------------------------------------------


def test_lora_targets_name_each_architecture_as_kohya(components: dict[str, dict[str, Any]]) -> None:
    sd15 = L.lora_targets("sd15", "unet", components["tiny-sd15"]["unet"].state_dict(), conv=True)
    assert sd15["down_blocks.0.attentions.0.proj_in"] == "lora_unet_down_blocks_0_attentions_0_proj_in"
    assert sd15["down_blocks.0.resnets.1.conv1"] == "lora_unet_down_blocks_0_resnets_1_conv1"
    sdxl_unet = components["tiny-sdxl"]["unet"]
    sdxl = L.lora_targets("sdxl", "unet", sdxl_unet.state_dict(), conv=True, unet_config=dict(sdxl_unet.config))
    assert sdxl["down_blocks.1.attentions.0.proj_in"] == "lora_unet_input_blocks_4_1_proj_in"
    assert sdxl["down_blocks.0.resnets.1.conv1"] == "lora_unet_input_blocks_2_0_in_layers_2"
    assert sdxl == L.lora_targets("sdxl", "unet", sdxl_unet.state_dict(), conv=True)  # layout from the keys alike
    te2 = L.lora_targets("sdxl", "text_encoder_2", components["tiny-sdxl"]["text_encoder_2"].state_dict())
    assert all(v.startswith("lora_te2_text_model_encoder_layers_") for v in te2.values()) and len(te2) == 12
    with pytest.raises(ValueError, match="`component`"):
        L.lora_targets("sd15", "text_encoder_2", [])
    with pytest.raises(ValueError, match="`arch`"):
        L.lora_targets("sd3", "unet", [])  # type: ignore[arg-type]


def test_modelspec_metadata() -> None:
    meta = L.modelspec_metadata("sdxl", "my-lora", date="2026-01-02T03:04:05+00:00", description="d")
    assert (
        meta["modelspec.sai_model_spec"] == "1.0.0"
        and meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    )
    assert meta["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"
    assert meta["modelspec.resolution"] == "1024x1024" and meta["modelspec.title"] == "my-lora"
    assert meta["modelspec.date"] == "2026-01-02T03:04:05+00:00" and meta["modelspec.description"] == "d"
    v1 = L.modelspec_metadata("sd15", "x")
    assert v1["modelspec.architecture"] == "stable-diffusion-v1/lora" and v1["modelspec.resolution"] == "512x512"
    assert v1["modelspec.implementation"] == "diffusers"
    with pytest.raises(ValueError, match="`arch`"):
        L.modelspec_metadata("sd3", "x")  # type: ignore[arg-type]


def test_sshs_hashes_follow_kohya_and_ignore_metadata(tmp_path: Path) -> None:
    import hashlib

    from safetensors.torch import save

    tensors = {
        "lora_unet_a.lora_down.weight": torch.randn(4, 300_000, generator=_gen(20)),
        "lora_unet_a.alpha": torch.tensor(4.0),
    }
    a = L.save_lora(tmp_path / "a.safetensors", tensors, {"ss_network_dim": "4"})
    b = L.save_lora(
        tmp_path / "b.safetensors",
        tensors,
        {"ss_network_dim": "4", "ss_note": "other metadata", "modelspec.title": "b"},
    )
    _, meta_a = L.load_lora(a)
    _, meta_b = L.load_lora(b)
    # kohya: sha256 of the bytes after the header of safetensors.torch.save(tensors); legacy: 64 KiB at 1 MiB
    data = save(tensors, {"ss_network_dim": "4"})
    body = data[8 + int.from_bytes(data[:8], "little") :]
    assert meta_a["sshs_model_hash"] == meta_b["sshs_model_hash"] == hashlib.sha256(body).hexdigest()
    assert meta_a["sshs_legacy_hash"] == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    assert meta_b["sshs_legacy_hash"] != meta_a["sshs_legacy_hash"]  # the header (ss_ metadata) shifts the window
    assert "sshs_model_hash" not in L.load_lora(L.save_lora(tmp_path / "c.safetensors", tensors, {}, hashes=False))[1]
