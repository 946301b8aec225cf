"""LyCORIS (LoHa, LoKr) and DoRA in mode lora (issue 14 item 3): trained a few steps on the tiny
SD1.5 model, saved, checked for kohya names and LyCORIS suffixes, loaded back into fresh models
(lycoris' own loader and loraforge's render adapter) with equal weights and equal outputs; the
finetune stage trains them, extract passes the file through byte for byte, resize passes it
through with a note, and evaluation's renderer applies it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from loraforge.lora.format import PREFIXES, load_lora, lora_targets
from loraforge.lora.lycoris import DeltaAdapter, component_targets, file_algo, layer_update, modules_from_weights
from loraforge.pipeline.runner import Paths, StageEnv, run_stage
from loraforge.store.items import ItemStore
from loraforge.models.tiny import build_tiny_sd15
from loraforge.training.checkpoints import SaveSettings, save_epoch
from loraforge.training.lora_net import LoraSettings
from loraforge.training.lycoris_net import LycorisNetwork
from loraforge.training.setup import trainable
from tests.helpers import make_project, set_params

SUFFIXES = {
    "loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"},
    "lokr": {"lokr_w1", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "alpha"},  # tiny layers: some w2 full, some split
    "dora": {"lora_down.weight", "lora_up.weight", "alpha", "dora_scale"},
}


def inputs(unet: Any, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A fixed UNet input (latents (1, 4, 16, 16), timestep, hidden (1, 77, D)) and token ids (1, 77)."""
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, 4, 16, 16, generator=g)
    hidden = torch.randn(1, 77, unet.config.cross_attention_dim, generator=g)
    ids = torch.randint(0, 100, (1, 77), generator=g)
    return latents, torch.tensor([500]), hidden, ids


@torch.no_grad()
def outputs(c: dict[str, Any], x: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """(UNet output (1, 4, 16, 16), text encoder hidden states (1, 77, D)) in eval mode."""
    c["unet"].eval(), c["text_encoder"].eval()
    return c["unet"](x[0], x[1], x[2]).sample, c["text_encoder"](x[3]).last_hidden_state


def train_a_few_steps(algo: str, folder: Path) -> tuple[dict[str, Any], dict[str, LycorisNetwork]]:
    """LoRA networks of `algo` on the tiny SD1.5 UNet and text encoder (convs too), two AdamW
    steps towards a constant target, saved as `folder/lora.safetensors` (float32)."""
    torch.manual_seed(0)
    c = build_tiny_sd15()
    s = LoraSettings(network_dim=4, network_alpha=2.0, conv_dim=2, conv_alpha=1.0, network_algo=algo)
    modules = {"unet": c["unet"], "text_encoder": c["text_encoder"]}
    nets = trainable("sd15", modules, {"unet": 1e-2, "text_encoder": 1e-2}, "lora", s, False)
    opt = torch.optim.AdamW([p for n in nets.values() for p in n.parameters()], lr=1e-2)
    x = inputs(c["unet"])
    for _ in range(2):
        hidden = c["text_encoder"](x[3]).last_hidden_state  # (1, 77, D)
        loss = c["unet"](x[0], x[1], hidden).sample.sub(1.0).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    about = {"arch": "sd15", "mode": "lora"}
    save = SaveSettings("lora", torch.float32, "sd15", s, 1e-2, "AdamW", 0, about)
    save_epoch(folder, nets, None, {"epoch": 1, "global_step": 3, "loss": loss.item()}, save)  # type: ignore[arg-type]
    return c, nets  # type: ignore[return-value]


@pytest.fixture(scope="module", params=["loha", "lokr", "dora"])
def trained(request, tmp_path_factory) -> tuple[str, dict[str, Any], dict[str, LycorisNetwork], Path]:
    """(algo, the trained models, their networks, the saved file), once per algo."""
    folder = tmp_path_factory.mktemp(request.param)
    c, nets = train_a_few_steps(request.param, folder)
    return request.param, c, nets, folder / "lora.safetensors"


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """Equal tensors under equal keys; a LoKr layer without low-rank factors (both Kronecker
    factors full) has no rank, so lycoris rebuilds it with alpha 1 (scale 1 either way)."""
    full = {k.split(".")[0] for k in a if k.endswith(".lokr_w1")} - {
        k.split(".")[0] for k in a if k.endswith(("_w1_a", "_w2_a"))
    }
    return a.keys() == b.keys() and all(
        torch.equal(a[k], b[k]) for k in a if not (k.endswith(".alpha") and k.split(".")[0] in full)
    )


def test_lycoris_file_has_kohya_names_and_loads_back_equal(trained):
    algo, c, nets, file = trained
    tensors, meta = load_lora(file)
    # names: the plain LoRA's kohya names (convs included), LyCORIS suffixes
    names = {k.split(".", 1)[0] for k in tensors}
    fresh = build_tiny_sd15()
    expected = set(lora_targets("sd15", "unet", fresh["unet"].state_dict(), conv=True).values())
    expected |= set(lora_targets("sd15", "text_encoder", fresh["text_encoder"].state_dict()).values())
    assert names == expected and {n.split("_")[1] for n in names} == {"unet", "te"}
    assert {k.split(".", 1)[1] for k in tensors} == SUFFIXES[algo] and file_algo(tensors) == algo
    assert meta["ss_network_module"] == "lycoris.kohya"
    assert json.loads(meta["ss_network_args"])["algo"] == ("locon" if algo == "dora" else algo)
    # the file holds the trained weights, and they moved from their initial values
    live = {k: v for n in nets.values() for k, v in n.kohya_state(2.0).items()}
    assert same(live, tensors)
    zero_init = {"loha": "hada_w2_a", "lokr": "lokr_w2", "dora": "lora_up.weight"}[algo]
    assert any(tensors[k].abs().max() > 0 for k in tensors if k.endswith("." + zero_init))
    x = inputs(c["unet"])
    trained, base = outputs(c, x), outputs(fresh, x)
    # lycoris' own loader onto fresh models: equal weights, equal outputs
    loaded = {
        name: LycorisNetwork.from_file(fresh[name], component_targets(fresh[name], "sd15", name), file)
        for name in PREFIXES["sd15"]
    }
    back = {k: v for n in loaded.values() for k, v in n.kohya_state(2.0).items()}
    assert same(back, tensors)
    again = outputs(fresh, x)
    for got, want, was in zip(again, trained, base):
        assert (want - was).abs().max() > 1e-4  # the adapters change both models
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_resize_command_refuses_a_lycoris_file_in_one_line(trained, tmp_path):
    from loraforge import cli

    algo, _, _, file = trained
    with pytest.raises(SystemExit, match=f"a {algo} file .* not SVD-resizable"):
        cli.main(["resize", str(file), "--rank", "2", "--out", str(tmp_path / "small.safetensors")])
    assert not (tmp_path / "small.safetensors").exists()


def test_render_adapter_applies_the_file_at_a_strength_and_removes_cleanly(trained):
    _, c, _, file = trained
    tensors, _ = load_lora(file)
    fresh = build_tiny_sd15()
    x = inputs(c["unet"])
    trained, base = outputs(c, x), outputs(fresh, x)
    adapter = DeltaAdapter({"unet": fresh["unet"], "text_encoder": fresh["text_encoder"]}, "sd15", tensors)
    for got, want in zip(outputs(fresh, x), trained):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    adapter.strength = 0.0
    assert all(torch.equal(g, b) for g, b in zip(outputs(fresh, x), base))
    adapter.strength = 0.5
    half = outputs(fresh, x)[0]
    assert 0 < (half - base[0]).abs().max() < (trained[0] - base[0]).abs().max()
    adapter.remove()
    assert all(torch.equal(g, b) for g, b in zip(outputs(fresh, x), base))
    with pytest.raises(ValueError, match="matches no layer"):  # a file for another model
        DeltaAdapter({"unet": fresh["unet"]}, "sd15", tensors)


def test_sdxl_lokr_uses_kohyas_sgm_names_and_renders_as_trained():
    from loraforge.models.tiny import build_tiny_sdxl
    from loraforge.training.lora_net import add_lora

    torch.manual_seed(0)
    unet, fresh = build_tiny_sdxl()["unet"], build_tiny_sdxl()["unet"]
    net = add_lora(unet, "sdxl", "unet", LoraSettings(network_dim=2, network_alpha=1.0, network_algo="lokr"))
    with torch.no_grad():  # a non-zero update without training: the zero-initialised factor drawn
        for m in net.layers.values():
            (m.lokr_w2 if m.use_w2 else m.lokr_w2_b).normal_(std=0.5)
    tensors = net.kohya_state(1.0)
    names = {k.split(".", 1)[0] for k in tensors}
    assert set(lora_targets("sdxl", "unet", fresh.state_dict(), unet_config=dict(fresh.config)).values()) == names
    assert any("_input_blocks_" in n for n in names) and not any("down_blocks" in n for n in names)
    c = fresh.config
    g = torch.Generator().manual_seed(0)
    extra = {
        "text_embeds": torch.randn(
            1, c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim, generator=g
        ),
        "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]),
    }
    x = (
        torch.randn(1, 4, 16, 16, generator=g),
        torch.tensor([500]),
        torch.randn(1, 77, c.cross_attention_dim, generator=g),
    )
    with torch.no_grad():
        want, base = unet.eval()(*x, added_cond_kwargs=extra).sample, fresh.eval()(*x, added_cond_kwargs=extra).sample
        DeltaAdapter({"unet": fresh}, "sdxl", tensors)
        got = fresh(*x, added_cond_kwargs=extra).sample  # (1, 4, 16, 16)
    assert (want - base).abs().max() > 1e-4
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_network_algo_params_are_checked():
    from stages.finetune_params import Params

    cases = {
        "needs `finetune.mode: lora`": {"network_algo": "loha"},
        "set `finetune.conv_dim` > 0": {"mode": "lora", "network_algo": "locon"},
        "not implemented by LyCORIS loha": {"mode": "lora", "network_algo": "loha", "network_dropout": 0.1},
        "applies to `finetune.network_algo: lokr` only": {"mode": "lora", "network_algo": "loha", "network_factor": 4},
        "does not apply to `network_algo: dora`": {"mode": "lora", "network_algo": "dora", "scale_weight_norms": 1},
        "ComfyUI skips them": {"mode": "lora", "network_algo": "lokr", "conv_dim": 2, "use_tucker": True},
        "loha or dora: it is `lora`": {"mode": "lora", "conv_dim": 2, "use_tucker": True},
    }
    for message, given in cases.items():
        with pytest.raises(ValueError, match=message):
            Params(model={}, **given)
    assert Params(model={}, mode="lora", network_algo="lokr", network_factor=4).network_factor == 4
    assert Params(model={}, mode="lora", network_algo="loha", conv_dim=2, use_tucker=True).use_tucker
    # locon is the plain LoRA network with the 3×3 convolutions: kohya's networks.lora file
    from loraforge.training.lora_net import LoRANetwork, add_lora

    net = add_lora(build_tiny_sd15()["unet"], "sd15", "unet", LoraSettings(conv_dim=2, network_algo="locon"))
    state = net.kohya_state(1.0)
    assert isinstance(net, LoRANetwork) and any(v.dim() == 4 and v.shape[-1] == 3 for v in state.values())


# ---------------------------------------------------------------- the stages


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """Tiny SD1.5 project with latents and captions of 2 demo images (3 repeats each)."""
    root = make_project(tmp_path_factory.mktemp("lyco") / "p", git=False)
    set_params(root, {"model": {"base": "builtin:tiny-sd15"}})
    images = sorted(p for p in (root / "data" / "demo").rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    for extra in images[2:]:
        extra.unlink()
        extra.with_suffix(".txt").unlink(missing_ok=True)
    for stage in ("ingest", "upscale", "caption", "latents"):
        run_stage(root, stage)
    return root


def env(project: Path) -> StageEnv:
    return StageEnv(
        store=ItemStore(project / ".loraforge" / "store"), state_dir=project / ".loraforge", show_progress=False
    )


def test_finetune_trains_loha_extract_and_resize_pass_it_through_evaluation_renders_it(project, tmp_path):
    from loraforge.pipeline.params import ModelParams
    from loraforge.evaluation.render import Renderer
    from stages import extract, finetune, resize

    model = {"base": "builtin:tiny-sd15", "device": "cpu"}
    params = finetune.Params(
        model=model, mode="lora", network_algo="loha", network_dim=4, network_alpha=2.0, epochs=1,
        batch_size=3, lr=1e-2, save_dtype="float32", train_text_encoder=False, scale_weight_norms=0.05, ema_decay=0.5,
    )  # fmt: skip
    ckpt = tmp_path / "checkpoints"
    ckpt.mkdir()
    data = Paths(latents=project / "data" / "latents", captions=project / "data" / "captions")
    finetune.run(params, data, Paths(checkpoints=ckpt, loss=tmp_path / "loss"), env(project))
    trained = ckpt / "epoch-0001" / "lora.safetensors"
    tensors, meta = load_lora(trained)
    assert file_algo(tensors) == "loha" and all(k.startswith("lora_unet_") for k in tensors)
    assert json.loads(meta["ss_network_args"]) == {"algo": "loha"} and meta["ss_network_module"] == "lycoris.kohya"
    # max-norm held: every saved layer's ΔW (rebuilt by lycoris' loader) is within 0.05
    head, *rows = (tmp_path / "loss" / "steps.tsv").read_text().splitlines()
    assert int(dict(zip(head.split("\t"), rows[-1].split("\t")))["keys_scaled"]) > 0
    unet = build_tiny_sd15()["unet"]
    layers = modules_from_weights(unet, component_targets(unet, "sd15", "unet"), tensors)
    assert layers.keys() == {k.split(".")[0] for k in tensors}
    assert max(layer_update(m).norm().item() for m in layers.values()) <= 0.05 * 1.001
    ema, _ = load_lora(ckpt / "epoch-0001" / "ema" / "lora.safetensors")  # the EMA saves the same layers
    assert ema.keys() == tensors.keys() and any(not torch.equal(ema[k], tensors[k]) for k in tensors)
    # extract passes the trained file through, byte for byte
    loras, final = tmp_path / "loras", tmp_path / "final" / "lora.safetensors"
    loras.mkdir(), final.parent.mkdir(), (tmp_path / "resized").mkdir()
    extract.run(extract.Params(model=model), Paths(checkpoints=ckpt), Paths(loras=loras), env(project))
    assert (loras / "lora-epoch-0001.safetensors").read_bytes() == trained.read_bytes()
    # resize does not SVD a LoHa: passed through, and the report says so
    report = resize.run(
        resize.Params(rank=2), Paths(loras=loras), Paths(loras=tmp_path / "resized", final=final), env(project)
    )
    assert final.read_bytes() == trained.read_bytes()
    entry = report["files"]["lora-epoch-0001.safetensors"]
    assert entry["passed_through"] and entry["algo"] == "loha" and "`resize.*` not applied" in entry["reason"]
    # evaluation's renderer applies it (diffusers alone would not), and weight 0 is the base model
    r = Renderer(ModelParams(**model), ItemStore(tmp_path / "store"), project / ".loraforge", size=64, steps=2,
                 guidance_scale=5.0, negative_prompt="")  # fmt: skip

    def image(lora: Path | None, weight: float) -> torch.Tensor:
        return torch.tensor(list(r._generate(lora, "lfxstyle", 1, weight).get_flattened_data()), dtype=torch.float32)

    base, with_lora = image(None, 0.0), image(final, 1.0)
    assert (with_lora - base).abs().max() > 0 and torch.equal(image(None, 0.0), base)


def test_a_tucker_lokr_file_stops_evaluation_in_one_line_naming_it(tmp_path):
    """An older loraforge wrote LoKr files with `.lokr_t2` (Tucker) convolutions that LyCORIS'
    loader fails on: rendering one stops with an InputError naming the file, not a traceback."""
    from safetensors.torch import save_file

    from loraforge.errors import InputError
    from loraforge.evaluation.render import lycoris_adapter

    layer = "lora_unet_down_blocks_0_resnets_0_conv1"
    tensors = {
        f"{layer}.lokr_w1": torch.ones(2, 2),
        f"{layer}.lokr_w2_a": torch.ones(2, 2),
        f"{layer}.lokr_w2_b": torch.ones(2, 2),
        f"{layer}.lokr_t2": torch.ones(2, 2, 3, 3),
        f"{layer}.alpha": torch.tensor(2.0),
    }
    path = tmp_path / "old-lokr.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(InputError, match=rf"old-lokr.safetensors: a LoKr with Tucker.*\(1 layers, e.g. {layer}\)"):
        lycoris_adapter(None, "sd15", path)
