"""`loraforge import-kohya`: kohya_ss GUI JSON and sd-scripts TOML configs with the guides' settings
land in the right params.yaml keys, the rest is listed with a reason, the file keeps its comments."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from loraforge import cli
from loraforge.errors import InputError
from loraforge.kohya.config import parse_flags, parse_pairs, typed
from loraforge.kohya.importer import import_kohya
from loraforge.pipeline.params import load_all_params
from loraforge.pipeline.spec import load_pipeline

# The 001 guide's SDXL full finetune (A100 config): AdamW at a constant 1e-6 for 100 epochs, repeats 2,
# batch 1 with gradient accumulation 3, EMA 0.9995 (an additional parameter), min-SNR 5, bf16, no half VAE.
GUIDE_001_GUI = {
    "pretrained_model_name_or_path": "stabilityai/stable-diffusion-xl-base-1.0",
    "train_data_dir": "img",
    "optimizer": "AdamW",
    "optimizer_args": "",
    "learning_rate": 1e-06,
    "lr_scheduler": "constant",
    "lr_warmup": 0,
    "max_train_epochs": "100",
    "epoch": 1,
    "train_batch_size": 1,
    "gradient_accumulation_steps": 3.0,
    "mixed_precision": "bf16",
    "save_precision": "fp16",
    "save_every_n_epochs": 10,
    "seed": "1234",
    "min_snr_gamma": 5,
    "additional_parameters": "--enable_ema --ema_decay=0.9995",
    "train_text_encoder": True,
    "sdxl_checkbox": True,
    "sdxl_no_half_vae": True,
    "max_resolution": "1024,1024",
    "enable_bucket": True,
    "min_bucket_reso": "256",
    "max_bucket_reso": "2048",
    "bucket_reso_steps": 64,
    "cache_latents": True,
    "xformers": "xformers",
    "clip_skip": "1",
    "wandb_api_key": "",
    "some_unknown_key": 3,
}
GUIDE_001_TOML = """
    [model_arguments]
    pretrained_model_name_or_path = "stabilityai/stable-diffusion-xl-base-1.0"
    [training_arguments]
    optimizer_type = "AdamW"
    learning_rate = 1e-6
    lr_scheduler = "constant"
    max_train_epochs = 100
    train_batch_size = 1
    gradient_accumulation_steps = 3
    mixed_precision = "bf16"
    save_precision = "fp16"
    save_every_n_epochs = 10
    seed = 1234
    min_snr_gamma = 5
    train_text_encoder = true
    enable_ema = true
    ema_decay = 0.9995
    no_half_vae = true
    cache_latents = true
    xformers = true
"""
GUIDE_001_DATASET = """
    [general]
    enable_bucket = true
    resolution = [1024, 1024]
    min_bucket_reso = 256
    max_bucket_reso = 2048
    bucket_reso_steps = 64
    [[datasets]]
    batch_size = 1
      [[datasets.subsets]]
      image_dir = "img/2_lfx style"
      num_repeats = 2
      class_tokens = "lfx style"
"""
# The 003 guide's LoRA: Prodigy at LR 1 with its extra arguments, dim/alpha, min-SNR 5, multires noise,
# scale weight norms, network dropout, shuffled captions keeping the activation tag.
GUIDE_003_TOML = """
    pretrained_model_name_or_path = "runwayml/stable-diffusion-v1-5"
    network_module = "networks.lora"
    network_dim = 32
    network_alpha = 16
    network_dropout = 0.1
    scale_weight_norms = 1.0
    optimizer_type = "Prodigy"
    learning_rate = 1
    optimizer_args = ["decouple=True", "weight_decay=0.01", "d_coef=0.8", "use_bias_correction=True",
                      "safeguard_warmup=True", "betas=0.9,0.99"]
    lr_scheduler = "cosine"
    lr_warmup_steps = 0.03
    max_train_epochs = 10
    save_every_n_epochs = 1
    min_snr_gamma = 5
    multires_noise_iterations = 8
    multires_noise_discount = 0.3
    shuffle_caption = true
    keep_tokens = 1
    resolution = "512,512"
"""
PRODIGY_ARGS = {
    "decouple": True,
    "weight_decay": 0.01,
    "d_coef": 0.8,
    "use_bias_correction": True,
    "safeguard_warmup": True,
    "betas": [0.9, 0.99],
}


@pytest.fixture
def project(tmp_path: Path, repo_root: Path) -> Path:
    """A temp project: the repo's pipeline.yaml and params.yaml, a kohya image folder `img/2_lfx style`."""
    for name in ("pipeline.yaml", "params.yaml"):
        shutil.copy(repo_root / name, tmp_path / name)
    (tmp_path / "img" / "2_lfx style").mkdir(parents=True)
    return tmp_path


def write(path: Path, text: str | dict) -> Path:
    path.write_text(json.dumps(text, indent=2) if isinstance(text, dict) else textwrap.dedent(text), encoding="utf-8")
    return path


def params_of(project: Path) -> dict:
    return yaml.safe_load((project / "params.yaml").read_text(encoding="utf-8"))


def run_cli(project: Path, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "loraforge", "import-kohya", *args]
    return subprocess.run(command, cwd=project, capture_output=True, text=True)


def test_001_gui_json_lands_in_params_yaml_and_validates(project, monkeypatch):
    monkeypatch.chdir(project)  # the GUI's train_data_dir is relative to where kohya ran
    config = write(project / "sdxl.json", GUIDE_001_GUI)
    import_kohya(config, None, project / "params.yaml")
    p = params_of(project)
    assert p["model"]["base"] == "stabilityai/stable-diffusion-xl-base-1.0"
    assert p["ingest"]["source"] == "img"  # its `2_lfx style` folder gives repeats 2, as in kohya
    assert p["caption"]["trigger"] == "lfx style" and p["caption"]["template"] == "{trigger}"
    assert p["latents"] | {"resolution": 1024, "bucket_step": 64, "min_bucket": 256, "max_bucket": 2048} == p["latents"]
    assert p["latents"]["vae_dtype"] == "float32"
    f = p["finetune"]
    assert (f["mode"], f["optimizer"], f["lr"], f["lr_scheduler"], f["epochs"]) == (
        "full",
        "AdamW",
        1e-6,
        "constant",
        100,
    )
    assert (f["batch_size"], f["gradient_accumulation"], f["ema_decay"], f["min_snr_gamma"]) == (1, 3, 0.9995, 5.0)
    assert (f["mixed_precision"], f["save_dtype"], f["seed"], f["save_every_n_epochs"]) == ("bf16", "float16", 1234, 10)
    assert f["train_text_encoder"] is True and f["text_encoder_lr"] == 1e-6  # kohya: the encoders at the same LR
    assert f["optimizer_args"] == {}  # none in the config: none left from an earlier import either
    typed_params = load_all_params(project, load_pipeline(project))["finetune"]
    assert typed_params.ema_decay == 0.9995 and typed_params.lr == 1e-6


def test_001_sd_scripts_toml_with_dataset_config_matches_the_gui_json(project, monkeypatch, repo_root):
    monkeypatch.chdir(project)
    import_kohya(write(project / "sdxl.json", GUIDE_001_GUI), None, project / "params.yaml")
    from_json = params_of(project)
    shutil.copy(repo_root / "params.yaml", project / "params.yaml")
    config = write(project / "sdxl.toml", GUIDE_001_TOML)
    import_kohya(config, write(project / "dataset.toml", GUIDE_001_DATASET), project / "params.yaml")
    p = params_of(project)
    assert p["ingest"]["source"] == "img/2_lfx style" and p["finetune"]["repeats"] == 2  # num_repeats, as kohya
    assert p["caption"]["trigger"] == "lfx style"  # the subset's class_tokens
    same = ("mode", "optimizer", "lr", "lr_scheduler", "epochs", "batch_size", "gradient_accumulation", "ema_decay")
    same += ("min_snr_gamma", "mixed_precision", "save_dtype", "seed", "train_text_encoder", "text_encoder_lr")
    assert {k: p["finetune"][k] for k in same} == {k: from_json["finetune"][k] for k in same}
    assert p["latents"] == from_json["latents"] and p["model"] == from_json["model"]


def test_003_lora_with_prodigy_from_sd_scripts_toml(project):
    import_kohya(write(project / "lora.toml", GUIDE_003_TOML), None, project / "params.yaml")
    f = params_of(project)["finetune"]
    assert f["mode"] == "lora" and f["optimizer"] == "Prodigy" and f["lr"] == 1.0
    assert f["optimizer_args"] == PRODIGY_ARGS  # typed: bools, floats, a list for betas
    assert f["text_encoder_lr"] == 1.0  # Prodigy wants equal LRs, and kohya gives the encoders the LR
    assert (f["network_dim"], f["network_alpha"], f["network_dropout"], f["scale_weight_norms"]) == (32, 16.0, 0.1, 1.0)
    assert (f["min_snr_gamma"], f["multires_noise_iterations"], f["multires_noise_discount"]) == (5.0, 8, 0.3)
    assert (f["shuffle_caption"], f["keep_tokens"], f["lr_warmup_ratio"], f["lr_scheduler"]) == (
        True,
        1,
        0.03,
        "cosine",
    )
    assert params_of(project)["resize"]["rank"] == 32  # the trained LoRA ships at its rank
    typed_params = load_all_params(project, load_pipeline(project))["finetune"]
    assert typed_params.optimizer_args["betas"] == [0.9, 0.99] and typed_params.optimizer_args["decouple"] is True


def test_003_gui_json_reads_the_guide_s_quoted_optimizer_arguments(project):
    config = {
        "LoRA_type": "Standard",
        "pretrained_model_name_or_path": "runwayml/stable-diffusion-v1-5",
        "optimizer": "Prodigy",
        "optimizer_args": '"decouple=True" "weight_decay=0.01" "d_coef=0.8" "use_bias_correction=True" '
        '"safeguard_warmup=True" "betas=0.9,0.99"',
        "learning_rate": 1.0,
        "unet_lr": 1.0,
        "text_encoder_lr": 1.0,
        "network_dim": 32,
        "network_alpha": 16,
        "conv_dim": 1,  # the GUI writes it for every LoRA type; a Standard LoRA does not use it
        "noise_offset_type": "Multires",
        "noise_offset": 0.05,  # not used by kohya with the Multires type
        "multires_noise_iterations": 8,
        "multires_noise_discount": 0.3,
        "use_cp": True,  # a LyCORIS option, not passed for a Standard LoRA
    }
    imp, _ = import_kohya(write(project / "lora.json", config), None, project / "params.yaml")
    f = params_of(project)["finetune"]
    assert f["mode"] == "lora" and f["optimizer_args"] == PRODIGY_ARGS
    assert "conv_dim" not in f and "noise_offset" not in f and f["multires_noise_iterations"] == 8
    assert imp.unmapped == []


def test_what_loraforge_does_not_train_is_reported_not_written(project):
    config = {
        "LoRA_type": "Kohya LoCon",
        "network_module": "networks.lora_sdxl",
        "train_on_input": True,
        "pretrained_model_name_or_path": "D:/models/sd_xl_base_1.0.ckpt",
        "vae": "D:/models/sdxl_vae.safetensors",
        "optimizer": "DAdaptAdanIP",
        "optimizer_args": "d0=1e-6",
        "max_resolution": "1024,768",
        "network_dim": 8,
    }
    imp, _ = import_kohya(write(project / "ia3.json", config), None, project / "params.yaml")
    reasons = dict(imp.unmapped)
    assert "model.allow_pickle" in reasons["pretrained_model_name_or_path"]  # mapped, with the opt-in it needs
    assert "DAdaptAdanIP" in reasons["optimizer"]
    assert "about 886" in reasons["max_resolution"]  # the same bucket area as 1024 × 768
    p = params_of(project)
    assert p["model"]["base"] == "D:/models/sd_xl_base_1.0.ckpt" and p["latents"]["resolution"] is None
    assert p["model"]["vae"] == "D:/models/sdxl_vae.safetensors"
    assert p["finetune"]["mode"] == "lora" and "optimizer_args" not in p["finetune"]  # its optimizer is not mapped


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({"network_module": "lycoris.kohya", "network_args": ["algo=loha", "use_tucker=True"]}, ("loha", -1, True)),
        ({"network_module": "lycoris.kohya", "network_args": ["algo=lokr", "factor=8"]}, ("lokr", 8, False)),
        ({"network_module": "lycoris.kohya", "network_args": ["algo=locon", "dora_wd=True"]}, ("dora", -1, False)),
        ({"LoRA_type": "LyCORIS/LoKr", "factor": -1, "decompose_both": True}, ("lokr", -1, False)),
    ],
)
def test_lycoris_algo_and_dora_map_onto_network_algo(project, settings, expected):
    config = {"pretrained_model_name_or_path": "runwayml/stable-diffusion-v1-5", "network_dim": 8, **settings}
    imp, _ = import_kohya(write(project / "lyco.json", config), None, project / "params.yaml")
    f = params_of(project)["finetune"]
    assert (f["network_algo"], f.get("network_factor"), f.get("use_tucker")) == expected
    assert f["decompose_both"] is ("decompose_both" in settings)  # written either way: no leftovers
    assert [k for k, _ in imp.unmapped if "algo" in k or "dora" in k or "factor" in k or "LoRA_type" in k] == []
    from stages.finetune_params import Params

    Params(model={}, **{k: v for k, v in f.items()})  # what was written validates


def test_a_dataset_config_gives_images_repeats_trigger_and_reg_images(project):
    dataset = """
        [[datasets]]
        resolution = 1024
          [[datasets.subsets]]
          image_dir = "img/2_lfx style"
          num_repeats = 2
          class_tokens = "lfx style"
          [[datasets.subsets]]
          image_dir = "img/1_other"
          [[datasets.subsets]]
          is_reg = true
          image_dir = "reg/1_woman"
          class_tokens = "woman"
        [[datasets]]
        resolution = 512
    """
    config = write(project / "train.toml", 'train_data_dir = "elsewhere"\nnetwork_dim = 4\n')
    imp, _ = import_kohya(config, write(project / "dataset.toml", dataset), project / "params.yaml")
    p = params_of(project)
    assert (p["ingest"]["source"], p["finetune"]["repeats"], p["caption"]["trigger"]) == (
        "img/2_lfx style",
        2,
        "lfx style",
    )
    assert p["finetune"]["reg_images"] == "reg/1_woman" and p["latents"]["resolution"] == 1024
    reasons = dict(imp.unmapped)
    assert "one folder" in reasons["subset img/1_other"] and "datasets[0]" in reasons["datasets[1]"]
    assert "subsets are used instead" in reasons["train_data_dir"]
    assert "class_tokens (is_reg)" not in reasons  # `woman` is its folder's name: the caption loraforge gives


def test_unmapped_settings_are_listed_with_their_reason(project, monkeypatch, capsys):
    monkeypatch.chdir(project)
    write(project / "sdxl.json", GUIDE_001_GUI | {"random_crop": True, "max_train_steps": 1600})
    assert cli.main(["import-kohya", "sdxl.json"]) == 0
    out = capsys.readouterr().out
    assert "`xformers`: loraforge uses torch SDPA attention; no setting needed" in out
    assert "`cache_latents`: latents are always cached (content-addressed)" in out
    assert "`some_unknown_key`: not a kohya setting loraforge knows" in out
    assert "`random_crop`: latents are encoded once per image" in out
    assert "max_train_steps" not in out  # kohya itself ignores it when max_train_epochs is set
    assert "finetune.ema_decay" in out and "<- ema_decay" in out
    assert "clip_skip" not in out and "wandb_api_key" not in out  # at kohya's default / empty: only counted


def test_out_of_range_values_are_reported_not_written(project):
    before = params_of(project)
    config = write(project / "x.json", {"learning_rate": 20, "lr_scheduler": "adafactor", "bucket_reso_steps": 36})
    imp, _ = import_kohya(config, None, project / "params.yaml")
    after = params_of(project)
    assert after["finetune"]["lr"] == before["finetune"]["lr"] and "lr_scheduler" not in after["finetune"]
    assert after["latents"]["bucket_step"] == before["latents"]["bucket_step"]
    reasons = dict(imp.unmapped)
    assert "less than or equal to 10" in reasons["learning_rate"]
    assert "constant" in reasons["lr_scheduler"]  # names what is allowed
    assert "multiple of 8" in reasons["bucket_reso_steps"]
    load_all_params(project, load_pipeline(project))


def test_comments_and_keys_not_imported_survive(project):
    original = (project / "params.yaml").read_text(encoding="utf-8")
    import_kohya(write(project / "lora.toml", GUIDE_003_TOML), None, project / "params.yaml")
    updated = (project / "params.yaml").read_text(encoding="utf-8")
    comments = [line.split("#", 1)[1] for line in original.splitlines() if "#" in line]
    assert all(c in updated for c in comments)
    assert '  background: "#ffffff"' in updated and "  sources: [sidecar, filename, template]" in updated
    before, after = yaml.safe_load(original), yaml.safe_load(updated)
    assert after["evaluate"] == before["evaluate"] and after["dataset"] == before["dataset"]
    assert after["upscale"] == before["upscale"] and after["extract"] == before["extract"]
    assert "\n\nfinetune:" in updated and "\n\nresize:" in updated  # sections still apart


def test_dry_run_prints_the_sections_and_writes_nothing(project):
    write(project / "lora.toml", GUIDE_003_TOML)
    before = (project / "params.yaml").read_bytes()
    result = run_cli(project, "lora.toml", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert (project / "params.yaml").read_bytes() == before
    shown = yaml.safe_load(result.stdout.split("would set")[0])
    assert shown["finetune"]["optimizer_args"] == PRODIGY_ARGS and "evaluate" not in shown


@pytest.mark.parametrize(
    "name, text, expected",
    [
        ("missing.json", None, "missing.json: no such file"),
        ("kohya.cfg", "this is neither", "kohya.cfg: not valid JSON"),
        ("kohya.json", '{"learning_rate": "fast"}', "kohya.json: `learning_rate` = 'fast': expected a number"),
        ("kohya.toml", "max_train_epochs = 2.5", "kohya.toml: `max_train_epochs` = 2.5: expected an integer"),
    ],
)
def test_a_bad_config_stops_with_one_line_naming_it(project, name, text, expected):
    if text is not None:
        (project / name).write_text(text, encoding="utf-8")
    before = (project / "params.yaml").read_bytes()
    result = run_cli(project, name)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"loraforge: {expected}")
    assert (project / "params.yaml").read_bytes() == before


def test_an_invalid_params_file_is_named_and_left_as_it_was(project):
    path = project / "params.yaml"
    path.write_text(path.read_text(encoding="utf-8").replace("  seed: 42\n", "  seed: 42\n  bogus: 1\n"))
    before = path.read_bytes()
    with pytest.raises(InputError, match=r"`finetune\.bogus` is not a known key"):
        import_kohya(write(project / "lora.toml", GUIDE_003_TOML), None, path)
    assert path.read_bytes() == before


def test_values_are_parsed_never_evaluated():
    assert typed("True") is True and typed("0.9,0.99") == [0.9, 0.99] and typed("1e-8") == 1e-8
    assert typed("__import__('os')") == "__import__('os')"
    assert parse_pairs("a=1 'b=x y'", "k", Path("f")) == {"a": 1, "b": "x y"}
    assert parse_flags("--enable_ema --ema_decay 0.9995 --x=2", Path("f")) == {
        "enable_ema": True,
        "ema_decay": "0.9995",
        "x": "2",
    }
    with pytest.raises(InputError, match="`optimizer_args`"):
        parse_pairs(["decouple"], "optimizer_args", Path("f"))


def test_list_literals_and_several_flag_values_are_all_kept():
    assert typed("[0.9,0.99]") == [0.9, 0.99] and typed("(0.9, 0.999)") == [0.9, 0.999]
    flags = parse_flags('--optimizer_args "weight_decay=0.1" "betas=[0.9,0.99]" --x=2 --y', Path("f"))
    assert flags["x"] == "2" and flags["y"] is True
    pairs = parse_pairs(flags["optimizer_args"], "optimizer_args", Path("f"))
    assert pairs == {"weight_decay": 0.1, "betas": [0.9, 0.99]}


def test_optimizer_args_from_additional_parameters_import_every_pair(project):
    config = {"optimizer": "AdamW", "additional_parameters": '--optimizer_args "weight_decay=0.05" "betas=[0.9,0.99]"'}
    import_kohya(write(project / "gui.json", config), None, project / "params.yaml")
    finetune = params_of(project)["finetune"]
    assert finetune["optimizer_args"] == {"weight_decay": 0.05, "betas": [0.9, 0.99]}  # both pairs, typed
    load_all_params(project, load_pipeline(project))  # and finetune's schema takes them


def test_alpha_mask_turns_on_the_masked_loss_and_kohya_s_masked_loss_says_where_masks_go(project):
    config = write(project / "masked.toml", "alpha_mask = true\nmasked_loss = true\nnetwork_dim = 4\n")
    imp, _ = import_kohya(config, None, project / "params.yaml")
    assert params_of(project)["finetune"]["masked_loss"] is True
    assert "`<stem>-mask.png`" in dict(imp.unmapped)["masked_loss"]


def test_fused_backward_pass_maps_and_full_bf16_points_to_weights_dtype(project):
    config = {"fused_backward_pass": True, "full_bf16": True, "max_grad_norm": 0}
    imp, _ = import_kohya(write(project / "memory.json", config), None, project / "params.yaml")
    assert params_of(project)["finetune"]["fused_backward"] is True
    assert "`finetune.weights_dtype: bfloat16`" in dict(imp.unmapped)["full_bf16"]


@pytest.mark.parametrize("value", ["no", "fp16", "bf16"])
def test_mixed_precision_no_is_written_as_a_string_yaml_1_1_readers_read_back(project, value):
    """kohya's `mixed_precision = "no"` (float32): written plain, PyYAML would read `no` as False."""
    imp, _ = import_kohya(
        write(project / "precision.toml", f'mixed_precision = "{value}"\n'), None, project / "params.yaml"
    )
    assert params_of(project)["finetune"]["mixed_precision"] == value  # yaml.safe_load, as every reader
    load_all_params(project, load_pipeline(project))  # and it validates


@pytest.mark.parametrize(("optimizer", "args", "decay"), [("Prodigy", [], 0.0), ("Lion", [], 0.0), ("AdamW", [], 0.01),
                                                          ("Prodigy", ["weight_decay=0.1"], None)])  # fmt: skip
def test_weight_decay_is_the_optimizer_s_own_default_when_its_args_lack_it(project, optimizer, args, decay):
    config = {"optimizer_type": optimizer, "optimizer_args": args, "learning_rate": 1.0}
    import_kohya(write(project / "opt.json", config), None, project / "params.yaml")
    finetune = params_of(project)["finetune"]
    if decay is None:  # set in the args: the args carry it (they win over finetune.weight_decay)
        assert finetune["optimizer_args"]["weight_decay"] == 0.1
    else:
        assert finetune["weight_decay"] == decay


def test_a_second_import_leaves_no_optimizer_args_of_the_first_behind(project):
    first = {"optimizer_type": "Prodigy", "optimizer_args": "decouple=True d_coef=0.8", "learning_rate": 1.0}
    import_kohya(write(project / "first.json", first), None, project / "params.yaml")
    assert params_of(project)["finetune"]["optimizer_args"] == {"decouple": True, "d_coef": 0.8}
    import_kohya(write(project / "second.json", {"optimizer_type": "AdamW"}), None, project / "params.yaml")
    finetune = params_of(project)["finetune"]
    assert finetune["optimizer"] == "AdamW" and finetune["optimizer_args"] == {}
    load_all_params(project, load_pipeline(project))


@pytest.mark.parametrize(
    ("config", "kind"),
    [
        ({"flux1_checkbox": True, "LoRA_type": "Flux1", "network_dim": 16}, "a Flux config"),
        ('network_module = "networks.lora_flux"\nae = "ae.safetensors"\n', "a Flux config"),
        ({"sd3_checkbox": True, "network_dim": 16}, "an SD3 config"),
        ({"token_string": "ohwx", "init_word": "style", "num_vectors_per_token": 8}, "a textual-inversion config"),
        ('network_module = "networks.control_net_lllite"\ncond_emb_dim = 32\n', "a ControlNet-LLLite config"),
        ({"LoRA_type": "LyCORIS/iA3", "network_dim": 8}, "an iA3 network config"),
        ({"LoRA_type": "LyCORIS/Diag-OFT", "network_dim": 8}, "a Diag-OFT network config"),
        ({"LoRA_type": "LyCORIS/GLoRA", "network_dim": 8}, "a GLoRA network config"),
        ({"LoRA_type": "Kohya DyLoRA", "network_dim": 8}, "a DyLoRA network config"),
        (
            'network_module = "lycoris.kohya"\nnetwork_args = ["algo=full"]\n',
            "a LyCORIS full (native fine-tuning) network",
        ),
    ],
)
def test_configs_for_other_models_or_methods_are_refused_naming_what_they_are(project, config, kind):
    path = project / ("other.toml" if isinstance(config, str) else "other.json")
    before = (project / "params.yaml").read_bytes()
    with pytest.raises(InputError, match=f"{path.name}: {re.escape(kind)}.*nothing was imported"):
        import_kohya(write(path, config), None, project / "params.yaml")
    assert (project / "params.yaml").read_bytes() == before
    result = run_cli(project, str(path))
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1  # one line, no traceback


def test_a_gui_lora_config_with_the_other_checkboxes_off_still_imports(project):
    config = {"LoRA_type": "Standard", "flux1_checkbox": False, "sd3_checkbox": "False", "network_dim": 8}
    import_kohya(write(project / "sdxl-lora.json", config), None, project / "params.yaml")
    assert params_of(project)["finetune"]["network_dim"] == 8


@pytest.mark.parametrize(
    ("general", "subset", "command_line", "expected"),
    [("", "num_repeats = 3\n", 7, 3), ("num_repeats = 5\n", "", 7, 5), ("", "", 7, 7), ("", "", None, 1)],
)
def test_repeats_follow_kohya_s_precedence_subset_dataset_general_then_the_command_line(
    project, general, subset, command_line, expected
):
    dataset = write(
        project / "dataset.toml",
        f'[general]\n{general}[[datasets]]\n[[datasets.subsets]]\nimage_dir = "img"\n{subset}',
    )
    config = {"network_dim": 4} | ({"dataset_repeats": command_line} if command_line is not None else {})
    import_kohya(write(project / "lora.json", config), dataset, project / "params.yaml")
    assert params_of(project)["finetune"]["repeats"] == expected


@pytest.mark.parametrize(
    ("rates", "train", "te1", "te2"),
    [
        ({"learning_rate_te": 2e-6}, True, 2e-6, None),  # SD1.5 DreamBooth
        ({"learning_rate_te1": 1e-6, "learning_rate_te2": 0}, True, 1e-6, 0.0),  # SDXL: the second frozen
        ({"learning_rate_te1": 0, "learning_rate_te2": 0}, False, None, None),  # both frozen: UNet only
    ],
)
def test_dreambooth_text_encoder_rates_are_written_and_zero_freezes(project, rates, train, te1, te2):
    import_kohya(write(project / "db.json", {"learning_rate": 4e-6, **rates}), None, project / "params.yaml")
    finetune = params_of(project)["finetune"]
    assert finetune["mode"] == "full" and finetune["train_text_encoder"] is train
    if train:
        assert finetune["text_encoder_lr"] == te1 and finetune.get("text_encoder_2_lr") == te2
    load_all_params(project, load_pipeline(project))


def test_class_tokens_caption_only_images_without_a_caption_file(tmp_path, monkeypatch):
    """End to end (ingest and caption on the tiny model): kohya trains `a.txt` as written and
    captions `b.png`, which has no caption file, with its folder's class tokens."""
    from loraforge.pipeline.runner import run_stage
    from tests.helpers import FAST_MODEL, make_project

    project = make_project(tmp_path / "p", {"model": FAST_MODEL}, git=False)
    folder = project / "img" / "2_lfx style"
    folder.mkdir(parents=True)
    for seed, name in enumerate(("a", "b")):  # unlike pictures (flat ones would be near-duplicates)
        pixels = np.random.default_rng(seed).integers(0, 256, (128, 128, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{name}.png")
    (folder / "a.txt").write_text("a red square\n", encoding="utf-8")
    monkeypatch.chdir(project)
    config = {"train_data_dir": "img", "network_dim": 4, "caption_extension": ".txt"}
    import_kohya(write(project / "lora.json", config), None, project / "params.yaml")
    for stage in ("ingest", "upscale", "caption"):
        run_stage(project, stage)
    rows = [json.loads(line) for line in (project / "data/captions/manifest.jsonl").read_text().splitlines()]
    captions = sorted(r["caption"] for r in rows)
    assert captions == ["a red square", "lfx style"]


def test_caption_prefix_and_suffix_map_onto_the_caption_stage(project):
    config = write(project / "p.toml", 'caption_prefix = "masterpiece,"\ncaption_suffix = ", 4k"\nnetwork_dim = 4\n')
    import_kohya(config, None, project / "params.yaml")
    caption = params_of(project)["caption"]
    assert (caption["prefix"], caption["suffix"]) == ("masterpiece,", ", 4k")


def test_a_plain_lora_import_after_a_lokr_one_leaves_no_lokr_settings(project):
    lokr = {"LoRA_type": "LyCORIS/LoKr", "network_dim": 8, "network_args": "factor=4 decompose_both=True"}
    import_kohya(write(project / "lokr.json", lokr), None, project / "params.yaml")
    f = params_of(project)["finetune"]
    assert (f["network_algo"], f["network_factor"], f["decompose_both"]) == ("lokr", 4, True)
    import_kohya(
        write(project / "lora.json", {"LoRA_type": "Standard", "network_dim": 8}), None, project / "params.yaml"
    )
    f = params_of(project)["finetune"]
    assert (f["network_algo"], f["network_factor"], f["decompose_both"], f["use_tucker"]) == ("lora", -1, False, False)
    load_all_params(project, load_pipeline(project))


def test_a_prefix_with_shuffled_captions_is_imported_and_the_difference_reported(project):
    config = write(project / "s.toml", 'caption_prefix = "masterpiece,"\nshuffle_caption = true\nnetwork_dim = 4\n')
    imp, _ = import_kohya(config, None, project / "params.yaml")
    assert params_of(project)["caption"]["prefix"] == "masterpiece,"
    assert "shuffled with the tags" in dict(imp.unmapped)["caption_prefix with shuffle_caption"]


@pytest.mark.parametrize(("value", "expected"), [(3, 3), (0, None)])
def test_save_last_n_epochs_maps_and_zero_keeps_every_checkpoint(project, value, expected):
    import_kohya(
        write(project / "s.json", {"save_last_n_epochs": value, "network_dim": 4}), None, project / "params.yaml"
    )
    assert params_of(project)["finetune"].get("save_last_n_epochs") == expected


def test_adafactor_s_relative_step_default_is_reported_not_trained_as_an_absolute_lr(project):
    config = {"optimizer": "Adafactor", "learning_rate": 1.0, "network_dim": 4}
    imp, _ = import_kohya(write(project / "ada.json", config), None, project / "params.yaml")
    assert "relative_step=True" in dict(imp.unmapped)["optimizer"]
    assert params_of(project)["finetune"]["optimizer_args"] == {}
    load_all_params(project, load_pipeline(project))
    explicit = {"optimizer": "Adafactor", "optimizer_args": "relative_step=False scale_parameter=False"}
    imp, _ = import_kohya(write(project / "ada2.json", explicit), None, project / "params.yaml")
    assert "optimizer" not in dict(imp.unmapped)
    assert params_of(project)["finetune"]["optimizer_args"] == {"relative_step": False, "scale_parameter": False}


def test_keep_tokens_separator_maps_onto_finetune(project):
    config = write(project / "sep.toml", 'keep_tokens_separator = "|||"\nshuffle_caption = true\nnetwork_dim = 4\n')
    import_kohya(config, None, project / "params.yaml")
    assert params_of(project)["finetune"]["keep_tokens_separator"] == "|||"
