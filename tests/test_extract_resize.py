"""Extraction and resize through files and the standalone commands, on tiny SD1.5 and SDXL:
diffusers loads every file, full rank reproduces the finetune, error falls with rank, resize to
its own rank is lossless, a hand-built kohya file resizes; metadata, hashes, streaming memory,
and a pipeline-produced LoRA loaded in a fresh process."""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save, save_file

from loraforge.lora import format as L
from loraforge.lora import resize as lora_resize
from loraforge.lora import svd as lora_svd
from loraforge.models import tiny
from loraforge.lora.commands import add_extract_command, add_resize_command
from loraforge.lora.extraction import WeightReader, open_source
from tests.helpers import MEMORY_SCRIPT, REPO, captured_messages, env_with_venv, make_project, set_params

ARCHS = ["tiny-sd15", "tiny-sdxl"]
ENCODERS = {"tiny-sd15": ["text_encoder"], "tiny-sdxl": ["text_encoder", "text_encoder_2"]}
BAD_WORDS = ("unexpected", "missing", "not match", "no lora keys", "ignored", "not been correctly")


def _cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="loraforge")
    sub = parser.add_subparsers(required=True)
    add_extract_command(sub)
    add_resize_command(sub)
    args = parser.parse_args([str(a) for a in argv])
    return args.func(args)


def _perturb(state: dict[str, torch.Tensor], keys: list[str], seed: int) -> dict[str, torch.Tensor]:
    """A simulated finetune: each weight in `keys` moved by a low-rank-plus-noise change."""
    g = torch.Generator().manual_seed(seed)
    tuned = dict(state)
    for key in keys:
        w = state[key]
        flat = w.flatten(1)  # (out, in_flat)
        k = min(4, *flat.shape)
        change = torch.randn(flat.shape[0], k, generator=g) @ torch.randn(k, flat.shape[1], generator=g) / k
        change += 0.05 * torch.randn(flat.shape, generator=g)
        tuned[key] = w + 0.2 * w.std() * change.reshape(w.shape)
    return tuned


class Models:
    """A tiny base diffusers folder and a finetuned copy (UNet and text encoders changed)."""

    def __init__(self, name: str, root: Path) -> None:
        self.name, self.arch = name, tiny.BUILTIN_ARCH[name]
        self.base_dir, self.tuned_dir = root / "base", root / "tuned"
        tiny.save_builtin(name, self.base_dir)
        pipe = tiny.build_pipeline(name)
        self.components = ["unet", *ENCODERS[name]]
        self.base = {c: {k: v.clone() for k, v in getattr(pipe, c).state_dict().items()} for c in self.components}
        self.targets = {c: L.lora_targets(self.arch, c, self.base[c], conv=True) for c in self.components}  # type: ignore[arg-type]
        self.tuned = {
            c: _perturb(self.base[c], [f"{m}.weight" for m in self.targets[c]], i)
            for i, c in enumerate(self.components)
        }
        for c in self.components:
            getattr(pipe, c).load_state_dict(self.tuned[c])
        pipe.save_pretrained(self.tuned_dir, safe_serialization=True)

    def pipeline(self, state: dict[str, dict[str, torch.Tensor]] | None = None) -> Any:
        pipe = tiny.build_pipeline(self.name)
        for c, sd in (state or {}).items():
            getattr(pipe, c).load_state_dict(sd)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def extract(self, out: Path, dim: int, *extra: str) -> Path:
        _cli(
            "extract",
            "--base",
            self.base_dir,
            "--tuned",
            self.tuned_dir,
            "--out",
            out,
            "--dim",
            dim,
            "--conv-dim",
            dim,
            "--save-dtype",
            "float32",
            "--svd",
            "full",
            *extra,
        )
        return out


@pytest.fixture(scope="module", params=ARCHS)
def models(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Models:
    return Models(request.param, tmp_path_factory.mktemp(request.param))


def _images(pipe: Any) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return pipe("a photo of a cat", num_inference_steps=2, height=64, width=64, generator=g, output_type="pt").images


def _spectrum(delta: torch.Tensor) -> torch.Tensor:
    """Singular values (float64, descending) of a Linear or conv weight change, as a matrix (out, in·kh·kw)."""
    return torch.linalg.svdvals(delta.flatten(1).double())


def _load_messages(pipe: Any, path: Path) -> list[str]:
    """Warnings and WARNING+ log lines of diffusers/transformers/peft while loading `path`."""
    with captured_messages() as messages:
        pipe.load_lora_weights(
            str(path), adapter_name="style"
        )  # not "x": transformers counts keys containing the adapter name as adapter keys
    return [m for m in messages if any(w in m.lower() for w in BAD_WORDS)]


# --------------------------------------------------------------------------------------------
# Round trips (a)–(d) through files and the CLI
# --------------------------------------------------------------------------------------------


def test_full_rank_file_loads_in_diffusers_and_reproduces_the_finetune(models: Models, tmp_path: Path) -> None:
    path = models.extract(tmp_path / "full.safetensors", 10_000)
    tensors, meta = L.load_lora(path)
    if models.arch == "sdxl":  # kohya's SDXL names
        assert any(k.startswith("lora_unet_input_blocks_") for k in tensors)
        assert not any(k.startswith("lora_unet_down_blocks_") for k in tensors)
        assert {k.split("_text_model")[0] for k in tensors if "_text_model" in k} == {"lora_te1", "lora_te2"}
    else:
        assert any(k.startswith("lora_unet_down_blocks_0_attentions_0_") for k in tensors)
        assert {k.split("_text_model")[0] for k in tensors if "_text_model" in k} == {"lora_te"}
    pipe = models.pipeline(models.base)
    base_images = _images(pipe)
    assert _load_messages(pipe, path) == []  # (a)
    from peft.tuners.tuners_utils import BaseTunerLayer

    for c in models.components:
        wrapped = {n for n, m in getattr(pipe, c).named_modules() if isinstance(m, BaseTunerLayer)}
        assert wrapped == set(models.targets[c]), c
    tuned_images = _images(models.pipeline(models.tuned))
    assert float((tuned_images - base_images).abs().max()) > 1e-2
    torch.testing.assert_close(_images(pipe), tuned_images, atol=2e-3, rtol=0)  # (b)
    for c in models.components:  # (b) on the weights themselves
        merged = L.apply_lora(models.base[c], tensors, models.targets[c])
        for key in (f"{m}.weight" for m in models.targets[c]):
            torch.testing.assert_close(merged[key], models.tuned[c][key], atol=1e-5, rtol=1e-4)


def test_error_falls_as_rank_rises(models: Models, tmp_path: Path) -> None:
    errors = []
    keys = [f"{m}.weight" for m in models.targets["unet"]]
    for dim in (1, 2, 4, 8):
        tensors, _ = L.load_lora(models.extract(tmp_path / f"r{dim}.safetensors", dim))
        merged = L.apply_lora(models.base["unet"], tensors, models.targets["unet"])
        err = sum(float((merged[k] - models.tuned["unet"][k]).pow(2).sum()) for k in keys)
        ref = sum(float((models.base["unet"][k] - models.tuned["unet"][k]).pow(2).sum()) for k in keys)
        errors.append((err / ref) ** 0.5)  # (c): relative Frobenius error of the UNet
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    # the best rank-r fit of a layer misses exactly its singular values past r (Eckart–Young)
    spectra = [_spectrum(models.tuned["unet"][k] - models.base["unet"][k]) for k in keys]
    total = sum(float(sv.pow(2).sum()) for sv in spectra)
    expected = [(sum(float(sv[dim:].pow(2).sum()) for sv in spectra) / total) ** 0.5 for dim in (1, 2, 4, 8)]
    assert errors == pytest.approx(expected, rel=1e-3), (errors, expected)


def test_resize_to_its_own_rank_is_lossless(models: Models, tmp_path: Path) -> None:
    src = models.extract(tmp_path / "r4.safetensors", 4)
    out = tmp_path / "same.safetensors"
    assert _cli("resize", src, "--rank", 4, "--out", out) == 0  # (d)
    before, _ = L.load_lora(src)
    after, meta = L.load_lora(out)
    assert sorted(after) == sorted(before)
    for name in L.lora_layers(before):
        old = L.merge_layer(before[name + L.UP], before[name + L.DOWN], float(before[name + L.ALPHA]))
        new = L.merge_layer(after[name + L.UP], after[name + L.DOWN], float(after[name + L.ALPHA]))
        assert after[name + L.DOWN].shape == before[name + L.DOWN].shape
        torch.testing.assert_close(new, old, atol=1e-5, rtol=1e-4, msg=name)
    assert meta["ss_network_dim"] == "4" and "resized by loraforge: fixed rank 4" in meta["ss_training_comment"]
    pipe = models.pipeline(models.base)
    assert _load_messages(pipe, out) == []


def test_dynamic_resize_file_loads_and_records_dynamic(models: Models, tmp_path: Path) -> None:
    src = models.extract(tmp_path / "r8.safetensors", 8)
    out, report = tmp_path / "dyn.safetensors", tmp_path / "dyn.json"
    _cli("resize", src, "--rank", 6, "--method", "sv_fro", "--param", 0.8, "--out", out, "--report", report)
    tensors, meta = L.load_lora(out)
    assert meta["ss_network_dim"] == "Dynamic" and meta["ss_network_alpha"] == "Dynamic"
    assert json.loads(meta["ss_resize"]) == {"method": "sv_fro", "rank": 6, "param": 0.8, "alpha": 6.0}
    rows = json.loads(report.read_text())
    assert {r["layer"] for r in rows} == set(L.lora_layers(tensors))
    source, _ = L.load_lora(src)
    for r in rows:  # each layer: the smallest rank keeping 80% of its Frobenius norm, at most 6
        name = r["layer"]
        sv = _spectrum(L.merge_layer(source[name + L.UP], source[name + L.DOWN], float(source[name + L.ALPHA])))
        kept = (torch.cumsum(sv.pow(2), 0) / sv.pow(2).sum()).sqrt()  # share kept by the top 1, 2, ...
        rank = min(int((kept < 0.8).sum()) + 1, 6, r["old_rank"])
        assert r["old_rank"] == source[name + L.DOWN].shape[0] and r["rank"] == rank, name
        assert r["fro_retained_pct"] == pytest.approx(100 * float(kept[rank - 1]), abs=1e-3), name
        assert r["sv_ratio_max_min"] == pytest.approx(float(sv[0] / sv[rank - 1]), rel=1e-3), name
    assert len({r["rank"] for r in rows}) > 1
    assert _load_messages(models.pipeline(models.base), out) == []


# --------------------------------------------------------------------------------------------
# (e) A LoRA written by kohya's conventions, built by hand from the documented format
# --------------------------------------------------------------------------------------------


def test_resize_reads_a_hand_built_kohya_sdxl_file(tmp_path: Path) -> None:
    # kohya's SDXL layout: sgm names, fp16 factors, per-layer alphas ≠ rank (alpha 1 at rank 8 is
    # common), fp16 alpha scalars, 4-D conv factors, and only `ss_*` metadata.
    g = torch.Generator().manual_seed(0)
    layers = {
        # shapes shrunk 10-20× from SDXL's (640², 1280², 1280²×3×3, 3072×768) to keep the test fast
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q": ((64, 64), 8, 1.0),
        "lora_unet_middle_block_1_proj_in": ((128, 128), 8, 4.0),
        "lora_unet_output_blocks_2_2_conv": ((64, 64, 3, 3), 4, 2.0),
        "lora_te1_text_model_encoder_layers_0_mlp_fc1": ((192, 48), 8, 8.0),
    }
    tensors: dict[str, torch.Tensor] = {}
    for name, (shape, rank, alpha) in layers.items():
        down_shape = (rank, *shape[1:])
        up_shape = (shape[0], rank, 1, 1) if len(shape) == 4 else (shape[0], rank)
        tensors[name + ".lora_down.weight"] = (0.1 * torch.randn(down_shape, generator=g)).half()
        tensors[name + ".lora_up.weight"] = (0.1 * torch.randn(up_shape, generator=g)).half()
        tensors[name + ".alpha"] = torch.tensor(alpha, dtype=torch.float16)
    src = tmp_path / "kohya.safetensors"
    save_file(
        tensors,
        src,
        metadata={
            "ss_network_module": "networks.lora",
            "ss_network_dim": "8",
            "ss_network_alpha": "1.0",
            "ss_base_model_version": "sdxl_base_v1-0",
        },
    )
    out = tmp_path / "small.safetensors"
    _cli("resize", src, "--rank", 2, "--out", out)
    resized, meta = L.load_lora(out)
    assert sorted(resized) == sorted(tensors)
    for name, (shape, _rank, alpha) in layers.items():
        assert resized[name + L.DOWN].shape == (2, *shape[1:]) and resized[name + L.DOWN].dtype == torch.float16
        old = L.merge_layer(tensors[name + L.UP], tensors[name + L.DOWN], alpha)  # kohya's scale alpha / rank
        new = L.merge_layer(resized[name + L.UP], resized[name + L.DOWN], float(resized[name + L.ALPHA]))
        best_up, best_down = lora_svd.extract_layer(old, 2)  # the best rank-2 fit of what the layer applied
        torch.testing.assert_close(
            new, L.merge_layer(best_up, best_down, 2.0), atol=2e-3 * float(old.abs().max()), rtol=0
        )
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta["ss_network_dim"] == "2"
    assert meta["sshs_model_hash"] == L.sshs_hashes(out)[0]


# --------------------------------------------------------------------------------------------
# Metadata and hashes
# --------------------------------------------------------------------------------------------


def test_extracted_file_metadata(models: Models, tmp_path: Path) -> None:
    path = models.extract(tmp_path / "meta.safetensors", 4, "--min-diff", "0")
    _, meta = L.load_lora(path)
    assert (
        meta["ss_network_module"] == "networks.lora"
        and meta["ss_network_dim"] == "4"
        and meta["ss_network_alpha"] == "4.0"
    )
    assert meta["ss_base_model_version"] == {"sd15": "sd_v1", "sdxl": "sdxl_base_v1-0"}[models.arch]
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": 4, "conv_alpha": 4}
    assert meta["modelspec.sai_model_spec"] == "1.0.0" and meta["modelspec.title"] == "meta"
    assert (
        meta["modelspec.architecture"]
        == {"sd15": "stable-diffusion-v1/lora", "sdxl": "stable-diffusion-xl-v1-base/lora"}[models.arch]
    )
    assert json.loads(meta["ss_min_diff"])["text_encoder"]["included"] is True
    assert len(meta["ss_loraforge_revision"]) >= 7
    # kohya's hash: SHA-256 of the tensor bytes after the header, independent of the metadata
    tensors, _ = L.load_lora(path)
    data = save(tensors)
    expected = hashlib.sha256(data[8 + int.from_bytes(data[:8], "little") :]).hexdigest()
    assert meta["sshs_model_hash"] == expected and len(meta["sshs_legacy_hash"]) == 8


def test_min_diff_leaves_an_unchanged_text_encoder_out_and_records_it(
    models: Models, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    path = models.extract(tmp_path / "md.safetensors", 4, "--min-diff", "1000")
    out = capsys.readouterr().out
    tensors, meta = L.load_lora(path)
    assert not any(k.startswith("lora_te") for k in tensors)
    decisions = json.loads(meta["ss_min_diff"])
    assert set(decisions) == set(ENCODERS[models.name])
    for encoder, d in decisions.items():
        keys = [f"{m}.weight" for m in models.targets[encoder]]
        largest = max(float((models.tuned[encoder][k] - models.base[encoder][k]).abs().max()) for k in keys)
        assert d["included"] is False and d["min_diff"] == 1000
        assert d["max_diff"] == pytest.approx(largest, rel=1e-6)
        assert f"{encoder} left out" in out and "--min-diff" in out
    assert json.loads(meta["ss_text_encoders"]) == {e: False for e in ENCODERS[models.name]}


def test_clamp_quantile_limits_the_saved_factors(models: Models, tmp_path: Path) -> None:
    free, _ = L.load_lora(models.extract(tmp_path / "free.safetensors", 4))
    clamped, _ = L.load_lora(models.extract(tmp_path / "clamp.safetensors", 4, "--clamp-quantile", "0.9"))
    name = next(n for n in L.lora_layers(free) if n.endswith("attn1_to_q"))
    up, down = free[name + L.UP], free[name + L.DOWN]
    limit = float(lora_svd._abs_quantile(torch.cat([up.flatten(), down.flatten()]), 0.9))
    assert (
        float(clamped[name + L.UP].abs().max()) <= limit + 1e-6
        and float(clamped[name + L.DOWN].abs().max()) <= limit + 1e-6
    )
    assert float(torch.cat([up.flatten(), down.flatten()]).abs().max()) > limit


# --------------------------------------------------------------------------------------------
# Readers, sources, SVD methods
# --------------------------------------------------------------------------------------------


def test_weight_reader_matches_safetensors_for_every_dtype_and_shards(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(1)
    first = {
        "a": torch.randn(3, 4, generator=g).half(),
        "b": torch.randn(2, 3, 3, 3, generator=g).bfloat16(),
        "e": torch.zeros(0),
    }
    second = {"c": torch.randn(5, generator=g).double(), "d": torch.arange(6, dtype=torch.int64).reshape(2, 3)}
    save_file(first, tmp_path / "1.safetensors")
    save_file(second, tmp_path / "2.safetensors")
    with WeightReader([tmp_path / "1.safetensors", tmp_path / "2.safetensors"]) as read:
        assert sorted(read.keys) == ["a", "b", "c", "d", "e"]
        for key, value in {**first, **second}.items():
            got = read(key)
            assert got.dtype == value.dtype and got.shape == value.shape and torch.equal(got, value), key
        with pytest.raises(KeyError, match="`zzz`"):
            read("zzz")
    with pytest.raises(ValueError, match="more than one"):
        with WeightReader([tmp_path / "1.safetensors", tmp_path / "1.safetensors"]):
            pass


def test_sources_single_file_unet_and_refusals(models: Models, tmp_path: Path) -> None:
    # a single-file diffusers-named UNet (like checkpoints/epoch-N/unet.safetensors) against the folder
    tuned_unet = tmp_path / "unet.safetensors"
    save_file(models.tuned["unet"], tuned_unet)
    assert open_source(tuned_unet).files == {"unet": [tuned_unet]}
    out = tmp_path / "unet-only.safetensors"
    _cli(
        "extract",
        "--base",
        models.base_dir,
        "--tuned",
        tuned_unet,
        "--out",
        out,
        "--dim",
        4,
        "--svd",
        "full",
        "--save-dtype",
        "float32",
    )
    tensors, meta = L.load_lora(out)
    assert tensors and all(k.startswith("lora_unet_") for k in tensors)
    assert meta["ss_base_model_version"] == {"sd15": "sd_v1", "sdxl": "sdxl_base_v1-0"}[models.arch]
    ldm = tmp_path / "ldm.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)}, ldm)
    with pytest.raises(ValueError, match="`--base`.*original \\(ldm\\)"):
        open_source(ldm, "--base")
    with pytest.raises(SystemExit, match="loraforge extract: `--tuned`.*original \\(ldm\\)"):
        _cli("extract", "--base", models.base_dir, "--tuned", ldm, "--out", out)
    (tmp_path / "w.ckpt").write_bytes(b"x")
    with pytest.raises(ValueError, match="only .safetensors"):
        open_source(tmp_path / "w.ckpt")
    with pytest.raises(SystemExit, match="`--dim`"):
        _cli("extract", "--base", models.base_dir, "--tuned", models.tuned_dir, "--out", out, "--dim", 0)
    with pytest.raises(SystemExit, match="`--param`"):
        _cli("resize", out, "--rank", 2, "--method", "sv_fro", "--param", 2, "--out", tmp_path / "x.safetensors")


def test_cli_choices_match_the_library_and_need_no_torch() -> None:
    from loraforge.lora import commands as lora_cli

    assert lora_cli.SVD_METHODS == lora_svd.SVD_METHODS and lora_cli.RESIZE_METHODS == lora_resize.RESIZE_METHODS
    code = (
        "import sys, argparse; import loraforge.lora.commands as c; "
        "c.add_extract_command(argparse.ArgumentParser().add_subparsers()); print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.stdout.strip() == "False", out.stderr


def test_lowrank_svd_matches_full_on_low_rank_plus_noise() -> None:
    g = torch.Generator().manual_seed(3)
    out_dim, in_dim, k = 320, 640, 24
    s = torch.logspace(0, -2, k)  # decaying spectrum
    delta = (torch.randn(out_dim, k, generator=g) * s) @ torch.randn(k, in_dim, generator=g) / k**0.5
    delta += 1e-3 * torch.randn(out_dim, in_dim, generator=g)
    errors = {}
    for svd in ("full", "lowrank"):
        torch.manual_seed(0)  # svd_lowrank draws from the global generator
        up, down = lora_svd.extract_layer(delta, 16, svd=svd)  # type: ignore[arg-type]
        errors[svd] = float((up @ down - delta).norm() / delta.norm())
    sv = _spectrum(delta)
    assert errors["full"] == pytest.approx(float(sv[16:].pow(2).sum().sqrt() / sv.pow(2).sum().sqrt()), rel=1e-4)
    # randomised: close to the optimum, never better than it beyond float32 rounding (1e-5)
    assert errors["full"] * (1 - 1e-5) <= errors["lowrank"] < errors["full"] * 1.01, errors
    # rank + oversampling ≥ the smaller side: lowrank falls back to the exact SVD
    small = torch.randn(20, 30, generator=g)
    torch.testing.assert_close(
        L.merge_layer(*lora_svd.extract_layer(small, 8, svd="lowrank"), 8.0),
        L.merge_layer(*lora_svd.extract_layer(small, 8, svd="full"), 8.0),
    )
    with pytest.raises(ValueError, match="`svd`"):
        lora_svd.extract_layer(small, 2, svd="random")  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# Bounded memory (small here; benchmarks/extract.py measures a few hundred MB)
# --------------------------------------------------------------------------------------------


def synthetic_unet(path: Path, layers: int, width: int, seed: int) -> int:
    """A UNet-named float16 state dict of `layers` (width, width) attention weights; returns its bytes."""
    g = torch.Generator().manual_seed(seed)
    state = {
        f"down_blocks.0.attentions.0.transformer_blocks.{i}.attn1.to_q.weight": torch.randn(
            width, width, generator=g
        ).half()
        for i in range(layers)
    }
    save_file(state, path)
    return path.stat().st_size


def test_extraction_peak_memory_stays_under_1_3x_one_model(tmp_path: Path) -> None:
    size = synthetic_unet(tmp_path / "base.safetensors", 48, 768, 0)  # 48 × 1.2 MB ≈ 57 MB
    synthetic_unet(tmp_path / "tuned.safetensors", 48, 768, 1)
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            MEMORY_SCRIPT,
            str(tmp_path / "base.safetensors"),
            str(tmp_path / "tuned.safetensors"),
            "4",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env_with_venv(),
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    stats = json.loads(result.stdout.strip().splitlines()[-1])
    assert stats["layers"] == 48
    # both models stream through: growth far below one model (two whole models would be 2×)
    assert stats["growth"] < 1.3 * size, (stats["growth"] / size, size)
    assert stats["growth"] < 0.5 * size, (stats["growth"] / size, size)


# --------------------------------------------------------------------------------------------
# A pipeline-produced LoRA loads in a fresh Python process, with no warnings
# --------------------------------------------------------------------------------------------

LOAD_SCRIPT = textwrap.dedent(
    """
    import json, logging, sys, warnings
    from loraforge.models import tiny
    messages = []
    class Collect(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())
    for name in ("diffusers", "transformers", "peft"):
        logging.getLogger(name).addHandler(Collect(level=logging.WARNING))
    pipe = tiny.build_pipeline(sys.argv[1])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe.load_lora_weights(sys.argv[2], adapter_name="shipped")
    messages += [str(w.message) for w in caught]
    from peft.tuners.tuners_utils import BaseTunerLayer
    wrapped = {c: sum(isinstance(m, BaseTunerLayer) for m in getattr(pipe, c).modules())
               for c in ("unet", "text_encoder", "text_encoder_2") if getattr(pipe, c, None) is not None}
    print(json.dumps({"messages": messages, "wrapped": wrapped}))
    """
)


@pytest.fixture(scope="module", params=ARCHS)
def pipeline_lora(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """A project on a tiny model run from ingest to resize (1 epoch); its shipped LoRA."""
    from loraforge.pipeline.runner import run_stage

    project = make_project(tmp_path_factory.mktemp("pipe") / "p", git=True)
    set_params(
        project,
        {
            "model": {"base": f"builtin:{request.param}"},
            "finetune": {"epochs": 1, "save_every_n_epochs": 1},
            "extract": {"dim": 8},
            "resize": {"rank": 4},
        },
    )
    for stage in ["ingest", "upscale", "caption", "latents", "finetune", "extract", "resize"]:
        run_stage(project, stage)
    return request.param, project


def test_pipeline_lora_loads_in_a_fresh_process_without_warnings(pipeline_lora: tuple[str, Path]) -> None:
    name, project = pipeline_lora
    final = project / "models" / "lora.safetensors"
    tensors, meta = L.load_lora(final)
    result = subprocess.run(
        [sys.executable, "-c", LOAD_SCRIPT, name, str(final)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**env_with_venv(), "HF_HUB_OFFLINE": "1"},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert [m for m in out["messages"] if any(w in m.lower() for w in BAD_WORDS)] == [], out["messages"]
    prefixes = {
        "unet": "lora_unet_",
        "text_encoder": "lora_te_" if name == "tiny-sd15" else "lora_te1_",
        "text_encoder_2": "lora_te2_",
    }
    for component, count in out["wrapped"].items():
        assert count == len([n for n in L.lora_layers(tensors) if n.startswith(prefixes[component])]), component
    assert out["wrapped"]["unet"] > 0
    # the header: kohya keys, resize record, dataset hash and the project's git revision
    assert (
        meta["ss_network_dim"] == "4"
        and meta["ss_base_model_version"] == {"tiny-sd15": "sd_v1", "tiny-sdxl": "sdxl_base_v1-0"}[name]
    )
    revision = subprocess.run(["git", "rev-parse", "HEAD"], cwd=project, capture_output=True, text=True).stdout.strip()
    assert meta["ss_loraforge_revision"].startswith(revision) and meta["ss_dataset_hash"]
    assert meta["sshs_model_hash"] == L.sshs_hashes(final)[0]
    report = json.loads((project / "reports" / "resize.json").read_text())
    table = report["files"]["lora-epoch-0001.safetensors"]["table"]
    assert {r["layer"] for r in table} == set(L.lora_layers(tensors))
    extracted, _ = L.load_lora(project / "models" / "extracted" / "lora-epoch-0001.safetensors")
    for r in table:  # fixed rank 4: each layer keeps the share of its norm its top 4 singular values hold
        name = r["layer"]
        sv = _spectrum(
            L.merge_layer(extracted[name + L.UP], extracted[name + L.DOWN], float(extracted[name + L.ALPHA]))
        )
        assert r["old_rank"] == extracted[name + L.DOWN].shape[0] and r["rank"] == min(4, r["old_rank"]), name
        kept = 100 * float(sv[: r["rank"]].pow(2).sum() / sv.pow(2).sum()) ** 0.5
        assert r["fro_retained_pct"] == pytest.approx(kept, abs=1e-3), name


def test_the_revision_is_dirty_only_when_the_pipeline_code_changed(tmp_path):
    """issue 10: outputs, dvc.lock and DVC's .gitignore entries must not make a rerun's LoRA say
    `-dirty` (its bytes would change); an edited stage must."""
    import subprocess

    from loraforge.lora.extraction import git_revision

    def git(*args: str) -> None:
        subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", *args], cwd=tmp_path, check=True,
                       capture_output=True)  # fmt: skip

    (tmp_path / "stages").mkdir()
    (tmp_path / "stages" / "x.py").write_text("A = 1\n")
    (tmp_path / ".gitignore").write_text("/models\n")
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\n")
    git("init", "-q")
    git("add", "-A")
    git("commit", "-qm", "c")
    head = git_revision(tmp_path)
    assert len(head) == 40
    (tmp_path / ".gitignore").write_text("/models\n/data/latents\n")  # what DVC appends
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")
    assert git_revision(tmp_path) == head
    (tmp_path / "stages" / "x.py").write_text("A = 2\n")
    assert git_revision(tmp_path) == head + "-dirty"
