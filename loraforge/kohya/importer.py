"""`loraforge import-kohya CONFIG [--dataset-config TOML] [--params params.yaml] [--dry-run]`: a kohya_ss
GUI JSON or sd-scripts TOML config (and dataset config) into params.yaml, by `loraforge.kohya.config`'s
tables. Every setting not written is listed with the reason: no counterpart, not needed, or out of range
for the stages' own `Params` (checked before writing, the whole file again after). Settings that are off,
at kohya's defaults or GUI bookkeeping are only counted. Comments and other keys stay as they were.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loraforge.kohya import config as kc
from loraforge.errors import InputError, MissingInput
from loraforge.pipeline.params import load_all_params, read_params_file
from loraforge.pipeline.params_edit import refuse_invalid, replace_checked, set_keys
from loraforge.pipeline.spec import PARAMS_FILE, PIPELINE_FILE, find_root, load_pipeline


@dataclass
class Imported:
    """What an import found.

    Attributes:
        config: the training config file (the file named in errors unless `files` says otherwise).
        files: kohya key -> the file it was read from, when not `config`.
        values: params.yaml section -> key -> value to write.
        origin: `section.key` -> the kohya key it came from (first word), with a note.
        unmapped: (kohya key, reason) for every setting not written.
        quiet: settings that were off, at kohya's defaults or GUI bookkeeping.
    """

    config: Path
    files: dict[str, Path] = field(default_factory=dict)
    values: dict[str, dict[str, Any]] = field(default_factory=dict)
    origin: dict[str, str] = field(default_factory=dict)
    unmapped: list[tuple[str, str]] = field(default_factory=list)
    quiet: int = 0

    def put(self, target: str, value: Any, source: str) -> None:
        """Write `value` to a params.yaml key.

        Args:
            target: `section.key`.
            value: the value, as params.yaml holds it.
            source: the kohya key it comes from (first word), then a note if any.
        """
        section, key = target.split(".")
        self.values.setdefault(section, {})[key] = value
        self.origin[target] = source

    def get(self, s: dict[str, Any], key: str, kind: str) -> Any:
        """Setting `key` of `s` as `kind`, or None when unset (absent, "", or 0 for kinds F / I).

        Args:
            s: the settings.
            key: the kohya key.
            kind: f, i, b, s, F or I (see `kohya_config.coerce`).
        """
        if s.get(key) in (None, ""):
            return None
        value = kc.coerce(s[key], kind, key, self.files.get(key, self.config))
        return None if kind in "FI" and value == 0 else value


def gather(config: Path, dataset_config: Path | None, imp: Imported) -> dict[str, Any]:
    """Every setting as one flat mapping: the config's, its `additional_parameters` and
    `network_args` spelled out, then the dataset config's first dataset and training subset.

    Args:
        config: the GUI JSON or sd-scripts TOML.
        dataset_config: the `--dataset_config` TOML; None: the one the config names, if any.
        imp: the import.
    """
    s = kc.read_config(config, flatten=True)
    if s.get("additional_parameters"):
        s.update(kc.parse_flags(s["additional_parameters"], config))  # later on kohya's command line: wins
    s.pop("additional_parameters", None)
    for name, value in kc.parse_pairs(s.pop("network_args", None) or [], "network_args", config).items():
        if name in kc.NETWORK_ARGS:
            s[name] = value
        else:
            imp.unmapped.append((f"network_args: {name}", "network option loraforge does not have"))
    named = imp.get(s, "dataset_config", "s")
    if dataset_config is None and named:
        found = [p for p in (Path(named), config.parent / named) if p.is_file()]
        if not found:
            imp.unmapped.append(("dataset_config", f"{named} is not here: pass it with --dataset-config"))
        dataset_config = found[0] if found else None
    if dataset_config is not None:
        s.update(map_dataset(s, kc.read_config(dataset_config), dataset_config, imp))
    return s


def map_repeats(s: dict[str, Any], subset: dict[str, Any], where: Path, imp: Imported) -> None:
    """`finetune.repeats` as kohya resolves it: the subset's `num_repeats` (or its dataset's, or
    `[general]`'s), else the training config's `dataset_repeats`, else 1.

    Args:
        s: the training config's settings (`dataset_repeats` leaves them here).
        subset: the training subset's merged settings (`num_repeats` leaves them here).
        where: the dataset config.
        imp: the import.
    """
    fallback = s.pop("dataset_repeats", None)
    if "num_repeats" in subset:
        imp.put("finetune.repeats", kc.coerce(subset.pop("num_repeats"), "i", "num_repeats", where), "num_repeats")
        if fallback is not None:
            imp.unmapped.append(
                ("dataset_repeats", f"{where.name}'s num_repeats wins (kohya: subset > dataset > general)")
            )
    elif fallback is not None:
        imp.put("finetune.repeats", kc.coerce(fallback, "i", "dataset_repeats", imp.config), "dataset_repeats")
    else:
        imp.put("finetune.repeats", 1, "num_repeats (kohya's default, 1)")


def captions_as_they_are(imp: Imported, key: str) -> None:
    """kohya uses the class tokens only as the caption of an image without a caption file, and
    trains caption files as they are: no trigger inserted, none required.

    Args:
        imp: the import.
        key: the kohya key the class tokens came from.
    """
    why = f"{key} (kohya: class tokens caption only the images without a caption file)"
    imp.put("caption.trigger_position", "none", why)
    imp.put("caption.require_trigger", False, why)


def map_dataset(s: dict[str, Any], data: dict[str, Any], where: Path, imp: Imported) -> dict[str, Any]:
    """Images, repeats, trigger and regularisation folder from a dataset config; returns the first
    training subset's remaining settings (flip, captions, buckets...) for the common tables.

    Args:
        s: the training config's settings (its data folders give way to the dataset config's).
        data: the dataset config.
        where: its file.
        imp: the import.
    """
    settings, subsets, count = kc.dataset_settings(data, where)
    for key in ("train_data_dir", "reg_data_dir"):
        if s.pop(key, None):
            imp.unmapped.append((key, f"{where.name}'s subsets are used instead (as kohya does)"))
    for i in range(1, count):
        imp.unmapped.append((f"datasets[{i}]", "loraforge trains one dataset: datasets[0] is imported"))
    train, reg = [x for x in subsets if not x.get("is_reg")], [x for x in subsets if x.get("is_reg")]
    for extra in train[1:] + reg[1:]:
        imp.unmapped.append((f"subset {extra.get('image_dir')}", kc.NOTES["subset"]))
    if reg:
        reg_dir = kc.coerce(reg[0].get("image_dir"), "s", "image_dir", where)
        imp.put("finetune.reg_images", reg_dir, "image_dir (is_reg)")
        folder = kc.REPEATS_FOLDER.sub(r"\2", Path(reg_dir).name)
        if reg[0].get("class_tokens") not in (None, folder):
            imp.unmapped.append(("class_tokens (is_reg)", f"{kc.NOTES['reg_tokens']} ({folder!r})"))
    first = dict(train[0]) if train else settings
    imp.files.update(dict.fromkeys(first, where))
    if train:
        imp.put("ingest.source", kc.coerce(first.pop("image_dir", None), "s", "image_dir", where), "image_dir")
        map_repeats(s, first, where, imp)
    if first.get("class_tokens"):  # kohya captions an image without a caption file with its class tokens
        imp.put("caption.trigger", kc.coerce(first["class_tokens"], "s", "class_tokens", where), "class_tokens")
        imp.put("caption.template", "{trigger}", "class_tokens (the caption of an image without a caption file)")
        captions_as_they_are(imp, "class_tokens")
    return {k: v for k, v in first.items() if k not in ("is_reg", "class_tokens", "image_dir", "num_repeats")}


def map_folders(s: dict[str, Any], imp: Imported) -> None:
    """The GUI's `train_data_dir` (parent of `N_name` folders, which give repeats and class tokens)
    and `reg_data_dir`; the trigger is the class tokens when the folders agree on them.

    Args:
        s: the settings.
        imp: the import.
    """
    if imp.get(s, "reg_data_dir", "s"):
        imp.put("finetune.reg_images", imp.get(s, "reg_data_dir", "s"), "reg_data_dir")
    key = "train_data_dir" if s.get("train_data_dir") else "image_folder"
    source = imp.get(s, key, "s")
    if not source:
        return
    imp.put("ingest.source", source, key)
    folder = Path(source).expanduser()
    subfolders = sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
    matches = {m.group(2): name for name in subfolders if (m := kc.REPEATS_FOLDER.match(name))}
    names = sorted(matches)
    if len(names) == 1:
        imp.put("caption.trigger", names[0], f"{key} (its folder `{matches[names[0]]}`)")
        imp.put("caption.template", "{trigger}", f"{key} (kohya's caption of an image without a caption file)")
        captions_as_they_are(imp, key)
    elif names:
        imp.unmapped.append((key, f"its folders name several class tokens ({', '.join(names)}): set `caption.trigger`"))
    elif not folder.is_dir():
        imp.unmapped.append((key, f"{folder} is not here: no trigger read from its `N_name` folders"))


def map_model(s: dict[str, Any], lora: bool, imp: Imported) -> None:
    """`model.base` and `model.vae`, precisions, the VAE dtype, resolution and resume.

    Args:
        s: the settings.
        lora: whether the config trains a network.
        imp: the import.
    """
    key = "pretrained_model_name_or_path"
    if base := imp.get(s, key, "s"):  # a hub id, a diffusers folder or a single-file checkpoint
        imp.put("model.base", base, key)
        if base.lower().endswith(kc.PICKLE_FILE):
            imp.unmapped.append((key, kc.NOTES["pickle_file"]))
    if vae := imp.get(s, "vae", "s"):
        imp.put("model.vae", vae, "vae")
    if imp.get(s, "no_half_vae", "b") or imp.get(s, "sdxl_no_half_vae", "b"):
        imp.put("latents.vae_dtype", "float32", "no_half_vae" if s.get("no_half_vae") else "sdxl_no_half_vae")
    precision = imp.get(s, "save_precision", "s")
    if precision and precision.lower() in kc.PRECISIONS:
        for target in ("finetune.save_dtype", "resize.save_dtype") if lora else ("finetune.save_dtype",):
            imp.put(target, kc.PRECISIONS[precision.lower()], "save_precision")
    elif precision:
        imp.unmapped.append(("save_precision", f"{precision!r} is not one of {', '.join(kc.PRECISIONS)}"))
    if imp.get(s, "save_state", "b"):
        imp.put("finetune.resume", "auto", "save_state (loraforge resumes from its saved state by itself)")
    key = "resolution" if s.get("resolution") not in (None, "") else "max_resolution"
    value = s.get(key)
    sides = value if isinstance(value, list) else str(value or "").replace("x", ",").split(",")
    sides = [kc.coerce(v, "i", key, imp.files.get(key, imp.config)) for v in sides if str(v).strip()]
    if len(sides) == 1 or (len(sides) == 2 and sides[0] == sides[1]):
        imp.put("latents.resolution", sides[0], key)
    elif sides:
        imp.unmapped.append((key, f"{value}: {kc.NOTES['area']} {math.isqrt(sides[0] * sides[-1])}"))


def map_rates(s: dict[str, Any], lora: bool, imp: Imported) -> None:
    """Learning rates and which text encoders train. kohya trains an encoder at the UNet's LR when
    it has none of its own (loraforge's null would be a quarter of it), so that LR is written.

    Args:
        s: the settings.
        lora: whether the config trains a network (its LRs are `unet_lr` / `text_encoder_lr`).
        imp: the import.
    """
    lr_key = "unet_lr" if lora and imp.get(s, "unet_lr", "F") else "learning_rate"
    lr = imp.get(s, lr_key, "f")
    if lr is not None:
        imp.put("finetune.lr", lr, lr_key)
    if lora:  # sd-scripts: one LR for both encoders, or a list of two; 0 freezes them
        te_key, te = "text_encoder_lr", s.get("text_encoder_lr")
        pair = [*te, None][:2] if isinstance(te, list) else (te, None)
        te1, te2 = (imp.get({te_key: v}, te_key, "f") for v in pair)
        if te1 == 0 and not imp.get(s, "unet_lr", "F") and "LoRA_type" in s:
            te1 = None  # the GUI: both LRs 0 means both at `learning_rate`
        train_te = not imp.get(s, "network_train_unet_only", "b") and te1 != 0
        imp.put("finetune.train_text_encoder", train_te, "text_encoder_lr / network_train_unet_only")
    else:
        te_key = "learning_rate_te1" if imp.get(s, "learning_rate_te1", "f") is not None else "learning_rate_te"
        te1, te2, train_te = imp.get(s, te_key, "f"), imp.get(s, "learning_rate_te2", "f"), None
        if te2 is None and te_key == "learning_rate_te1":
            te2 = lr  # sdxl_train: the second encoder's LR defaults to the UNet's
        rates = {k: imp.get(s, k, "f") for k in ("learning_rate_te", "learning_rate_te1", "learning_rate_te2")}
        rates = {k: v for k, v in rates.items() if v is not None}
        if imp.get(s, "train_text_encoder", "b") is not None:
            train_te = imp.get(s, "train_text_encoder", "b")
            imp.put("finetune.train_text_encoder", train_te, "train_text_encoder")
        elif rates:  # the GUI's DreamBooth / finetune: an encoder with a rate above 0 trains, 0 freezes it
            train_te = any(v > 0 for v in rates.values())
            imp.put("finetune.train_text_encoder", train_te, f"{', '.join(rates)} (a rate above 0 trains)")
    if train_te and te1 is not None:
        imp.put("finetune.text_encoder_lr", te1, te_key)
    elif train_te and lr is not None:
        imp.put("finetune.text_encoder_lr", lr, f"{lr_key} (kohya: an encoder without its own LR trains at this)")
    if train_te and te2 is not None:
        imp.put("finetune.text_encoder_2_lr", te2, "text_encoder_lr" if lora else "learning_rate_te2")


def map_schedule(s: dict[str, Any], imp: Imported) -> None:
    """Epochs (`max_train_epochs`, else the GUI's `epoch`), warmup and EMA.

    Args:
        s: the settings.
        imp: the import.
    """
    epochs_key = next((k for k in ("max_train_epochs", "epoch") if imp.get(s, k, "I")), None)
    if epochs_key:
        imp.put("finetune.epochs", imp.get(s, epochs_key, "I"), epochs_key)
    warmup = imp.get(s, "lr_warmup_steps", "F")
    if warmup is not None and warmup < 1:  # sd-scripts: below 1 is a share of all steps
        imp.put("finetune.lr_warmup_ratio", warmup, "lr_warmup_steps")
    elif warmup is not None:
        imp.put("finetune.lr_warmup_steps", kc.coerce(warmup, "i", "lr_warmup_steps", imp.config), "lr_warmup_steps")
    elif imp.get(s, "lr_warmup", "F") is not None:  # the GUI: a percentage of all steps
        imp.put("finetune.lr_warmup_ratio", imp.get(s, "lr_warmup", "F") / 100, "lr_warmup (percent)")
    ema = "enable_ema" if "enable_ema" in s else "use_ema"
    if imp.get(s, ema, "b") and imp.get(s, "ema_decay", "f") is not None:
        imp.put("finetune.ema_decay", imp.get(s, "ema_decay", "f"), "ema_decay")
    elif imp.get(s, ema, "b"):
        imp.unmapped.append((ema, kc.NOTES["ema"]))
    for key in s:
        if key.startswith("ema_") and key != "ema_decay" and not kc.inactive(s[key], key):
            imp.unmapped.append((key, kc.NOTES["ema_option"]))


NETWORK_DEFAULTS = {
    "finetune.network_algo": "lora",
    "finetune.network_factor": -1,
    "finetune.decompose_both": False,
    "finetune.use_tucker": False,
}


def map_optimizer_and_network(s: dict[str, Any], lora: bool, imp: Imported) -> None:
    """`finetune.optimizer` (kohya's names, or a `module.Class` path), its arguments, and the
    network: dim and alpha (kohya's defaults 4 and 1), which `resize` keeps (the LoRA ships as trained).

    Args:
        s: the settings.
        lora: whether the config trains a network.
        imp: the import.
    """
    key = "optimizer_type" if s.get("optimizer_type") else "optimizer"
    old_flags = "AdamW8bit" if s.get("use_8bit_adam") else "Lion" if s.get("use_lion_optimizer") else None
    name = imp.get(s, key, "s") or old_flags
    args = kc.parse_pairs(s["optimizer_args"], "optimizer_args", imp.config) if s.get("optimizer_args") else {}
    mapped = kc.OPTIMIZERS.get(name.lower(), name if "." in name else None) if name else None
    if name and not mapped:
        imp.unmapped.append((key, f"{name!r}: {kc.NOTES['optimizer']}"))
        args = {}
    elif name:
        imp.put("finetune.optimizer", mapped, key)
        args = {"momentum": 0.9, "nesterov": True, **args} if name.lower() == "sgdnesterov" else args  # as kohya
        if mapped == "Adafactor" and args.get("relative_step", True) is not False:
            imp.unmapped.append(
                (key, "kohya's Adafactor defaults to relative_step=True (its own step size; the LR only starts it); "
                 "loraforge trains Adafactor with relative_step=False at `finetune.lr`: set a real LR there")
            )  # fmt: skip
            args = {k: v for k, v in args.items() if k not in ("relative_step", "scale_parameter", "warmup_init")}
        if "weight_decay" not in args and mapped in kc.OWN_WEIGHT_DECAY:
            why = f"{key} without weight_decay in optimizer_args: {mapped}'s own default (kohya passes none)"
            imp.put("finetune.weight_decay", kc.OWN_WEIGHT_DECAY[mapped], why)
    if args or mapped:  # a new optimizer never keeps an earlier import's arguments
        imp.put("finetune.optimizer_args", args, "optimizer_args")
    imp.put("finetune.mode", "lora" if lora else "full", "network_* keys" if lora else "(no network_* keys)")
    if not lora:
        return
    # loraforge's layer filter is for full finetunes; kohya's network trains its own layers
    imp.put("finetune.unet_layers", "all", "network_* keys (unet_layers applies to mode full)")
    dim, alpha = imp.get(s, "network_dim", "i") or 4, imp.get(s, "network_alpha", "f")
    imp.put("finetune.network_dim", dim, "network_dim")
    imp.put("finetune.network_alpha", 1.0 if alpha is None else alpha, "network_alpha")
    imp.put("resize.rank", dim, "network_dim (the trained LoRA ships at its rank)")
    imp.put("resize.method", "fixed", "network_dim (the trained LoRA ships at its rank)")
    lycoris = kc.lycoris_settings(s, imp.config)  # LoHa / LoKr / DoRA
    for target, value, source in lycoris:
        imp.put(target, value, source)
    given = {target for target, _, _ in lycoris}
    for target, value in NETWORK_DEFAULTS.items():  # no leftovers of an earlier import's network
        if target not in given:
            imp.put(target, value, "network_* keys (not set: a plain LoRA, as kohya)")
    for key in ("LoRA_type", "network_module"):
        value = s.get(key)
        if not kc.inactive(value, key) and not (key == "network_module" and value == "lycoris.kohya"):
            imp.unmapped.append((key, f"{value!r}: {kc.NOTES['network']}"))


def map_settings(s: dict[str, Any], imp: Imported) -> None:
    """Every setting: by the handlers above, the direct table, or into the report with its reason.

    Args:
        s: the settings (see `gather`).
        imp: the import.
    """
    lora = any(s.get(k) not in (None, "", 0) for k in ("network_module", "network_dim", "LoRA_type"))
    map_folders(s, imp)
    map_model(s, lora, imp)
    map_rates(s, lora, imp)
    map_schedule(s, imp)
    map_optimizer_and_network(s, lora, imp)
    done = {o.split()[0] for o in imp.origin.values()} | {k for k, _ in imp.unmapped}
    skip = kc.SILENT | kc.HANDLED | kc.ignored_by_kohya(s, lora)
    for key, value in s.items():
        if key in done or key in skip or key.startswith("ema_"):
            continue
        if key in kc.DIRECT and imp.get(s, key, kc.DIRECT[key][1]) is not None:
            imp.put(kc.DIRECT[key][0], imp.get(s, key, kc.DIRECT[key][1]), key)
        elif key in kc.REASONS and not kc.inactive(value, key):
            imp.unmapped.append((key, kc.REASONS[key]))
        elif key not in kc.DIRECT and key not in kc.REASONS and not kc.inactive(value, key):
            imp.unmapped.append((key, "not a kohya setting loraforge knows"))
    framed = [k for k in ("caption_prefix", "caption_suffix") if not kc.inactive(s.get(k), k)]
    if framed and imp.get(s, "shuffle_caption", "b"):
        imp.unmapped.append(
            (f"{' / '.join(framed)} with shuffle_caption", "written into the caption files, so shuffled with the tags "
             "(sd-scripts adds them after shuffling): raise `finetune.keep_tokens` over a prefix, or stop shuffling")
        )  # fmt: skip
    done = {o.split()[0] for o in imp.origin.values()} | {k for k, _ in imp.unmapped}
    imp.quiet = sum(1 for key in s if key not in done)


def import_kohya(config: Path, dataset: Path | None, params: Path, dry_run: bool = False) -> tuple[Imported, str]:
    """Read the kohya config(s), update `params` (unless `dry_run`) and validate the result.

    Args:
        config: a kohya_ss GUI JSON or sd-scripts TOML training config.
        dataset: an sd-scripts dataset config; None: the one `config` names, if any.
        params: the project's params.yaml (a pipeline.yaml beside it).
        dry_run: write nothing.

    Returns:
        What was imported, and the updated sections as YAML text.
    """
    if params.name != PARAMS_FILE or not params.is_file() or not (params.parent / PIPELINE_FILE).is_file():
        raise MissingInput(f"{params}: not a project's {PARAMS_FILE} (a {PARAMS_FILE} beside a {PIPELINE_FILE})")
    imp = Imported(config=config)
    settings = gather(config, dataset, imp)
    kc.refuse_other_kinds(settings, config)
    map_settings(settings, imp)
    root, text = params.parent, params.read_text(encoding="utf-8")
    pipeline = load_pipeline(root)
    refused, problems = refuse_invalid(imp.values, read_params_file(root), pipeline)
    for target, reason in refused.items():
        imp.unmapped.append((imp.origin.pop(target).split()[0], f"out of range for loraforge: {reason}"))
    if problems:
        raise InputError(f"{params} does not validate, so nothing was imported: " + "; ".join(problems))
    new, part = set_keys(text, imp.values)
    if not dry_run:  # the whole file as every stage reads it; on failure the old text goes back
        replace_checked(params, new, lambda: load_all_params(root, pipeline), "with the imported settings")
    return imp, part


def format_report(imp: Imported, params: Path, dry_run: bool) -> str:
    """What was written where, then every setting not written and why, then how many were quiet.

    Args:
        imp: the import.
        params: the params.yaml path to show.
        dry_run: whether nothing was written.
    """
    width = max((len(t) for t in imp.origin), default=0)
    lines = [f"{'would set' if dry_run else 'set'} {len(imp.origin)} keys in {params}:"]
    for target, source in imp.origin.items():
        section, key = target.split(".")
        lines.append(f"  {target:<{width}} = {json.dumps(imp.values[section][key])}   <- {source}")
    lines.append(f"not mapped ({len(imp.unmapped)}):")
    lines += [f"  `{key}`: {reason}" for key, reason in imp.unmapped]
    lines.append(f"{imp.quiet} more settings are off, at kohya's defaults or GUI bookkeeping: nothing to carry over")
    return "\n".join(lines)


def _run_command(args: argparse.Namespace) -> int:
    params = args.params or find_root() / PARAMS_FILE
    imp, sections = import_kohya(args.config, args.dataset_config, params, args.dry_run)
    shown = Path(os.path.relpath(params))
    if args.dry_run:
        print(f"# {shown} would read, in the sections imported:\n{sections}")
    print(format_report(imp, shown, args.dry_run))
    return 0


def add_import_kohya_command(subparsers: Any) -> None:
    """Register `loraforge import-kohya CONFIG [--dataset-config TOML] [--params FILE] [--dry-run]`.

    Args:
        subparsers: the object `ArgumentParser.add_subparsers()` returned.
    """
    p = subparsers.add_parser("import-kohya", help="params.yaml from a kohya_ss / sd-scripts config; lists the rest")
    p.add_argument("config", type=Path, help="kohya_ss GUI config (.json) or sd-scripts --config_file (.toml)")
    p.add_argument("--dataset-config", type=Path, metavar="TOML", help="sd-scripts dataset config (default: CONFIG's)")
    p.add_argument("--params", type=Path, metavar="FILE", help="the params.yaml to update (default: the project's)")
    p.add_argument("--dry-run", action="store_true", help="print the updated sections instead of writing them")
    p.set_defaults(func=_run_command)
