"""LoRA quality on the learned base: the demo trained past its best, judged by the shapes world's oracle.

    python benchmarks/quality.py [--epochs 160] [--every 20] [--prompts 16] [--weights 0,0.5,1,1.5]
        [--validation 0] [--dims 4,8,16,32,64,full] [--resize-ranks 4,8,16] [--threads N] [--keep DIR]

Copies the project's declaration, code, `data/demo`, `data/demo-reg` and `data/demo-val` into a
temp folder (or `--keep DIR`), takes params.yaml as it is at run time with `model.base:
builtin:shapes-sdxl` (the world the oracle reads), `--epochs` / `--every` for finetune (with
`--validation N`, a validation folder of N new styled world images instead of the demo's) and a
cheap evaluate sweep (weights 0, 1 and the check weight; the demo's prompts and seeds), then runs
every stage in-process and prints the seconds each took.

The oracle (`loraforge.shapes.oracle`) then reads renders of the pipeline's per-epoch LoRAs
(`models/loras`, the ones `evaluate` judged) at 128 px, 20 Euler steps, guidance 6, fixed seeds;
`--prompts` prompts per group, all measured in this one run:

1. Per saved epoch and LoRA weight (weight 0 = the base model, rendered once): the style score with
   the trigger (captions of seen scenes + ", <trigger>"), the style bleeding without it (the same
   captions), faithfulness with the trigger on seen and on `HELD_OUT` combinations (share of renders
   whose shape colour and background are right); per epoch, evaluate's memorisation (and the base
   model's), finetune's validation loss and train loss.
2. The epoch evaluate recommends (reports/eval/best.json) beside the oracle's best (the rule is
   printed), and the gap between them in epochs and in saved checkpoints; then the oracle's ties
   (epochs within one standard error of the best style) and the gap to the nearest of them.
3. Extraction ranks: the checkpoint of the oracle's best epoch (when none meets the rule, of the
   most styled one) extracted in-process at each of `--dims` (conv_dim = dim; `full` caps every
   layer at its full rank), the largest of them resized to each of `--resize-ranks`, and the
   pipeline's own LoRA of that epoch: per LoRA, the mean absolute pixel difference (0-255) of its
   triggered renders to the full finetune's (the checkpoint's weights loaded into the pipeline)
   and its style.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from loraforge.shapes.oracle import read  # noqa: E402
from loraforge.shapes.world import HELD_OUT, Scene, render, scenes  # noqa: E402
from tests.helpers import make_project  # noqa: E402

STAGES = ("ingest", "upscale", "caption", "latents", "finetune", "extract", "resize", "evaluate")
BASE = "builtin:shapes-sdxl"
SIZE, STEPS, GUIDANCE = 128, 20, 6.0
SEEN_SEED = 4242  # the seen captions prompted (the demo's images are a fixed list; its reg images use 777)
VALIDATION_SEED = 9001
VALIDATION_DIR = "data/validation"
FAITHFUL_DROP, MAX_BLEED = 0.15, 0.15  # the oracle-best rule's limits
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


# ---------------------------------------------------------------- the project


def copy_project(dest: Path) -> Path:
    """The project's declaration, code and demo data in `dest`, with params.yaml's own demo
    (`tests.helpers.make_project`, as `benchmarks/pipeline_cache.py` builds its project)."""
    return make_project(dest, git=False, learned=True)


def write_validation(folder: Path, count: int, trigger: str) -> None:
    """`count` styled world images with trigger-last sidecar captions, none of a `HELD_OUT` combination.

    Args:
        folder: where they go (created).
        count: how many.
        trigger: the caption trigger.
    """
    folder.mkdir(parents=True, exist_ok=True)
    for i, scene in enumerate(scenes(VALIDATION_SEED, count, held_out=False, styled=True)):
        render(scene).save(folder / f"val_{i:03d}.png")
        (folder / f"val_{i:03d}.txt").write_text(f"{scene.caption}, {trigger}\n", encoding="utf-8")


def configure(project: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Set the benchmark's params on top of params.yaml's (read now); returns the whole file.

    Args:
        project: the project copy.
        args: the command line.
    """
    path = project / "params.yaml"
    params = yaml.safe_load(path.read_text())
    params.setdefault("model", {})["base"] = BASE
    finetune = params.setdefault("finetune", {})
    finetune.update(epochs=args.epochs, save_every_n_epochs=args.every)
    if args.validation:
        write_validation(project / VALIDATION_DIR, args.validation, params["caption"]["trigger"])
        finetune.update(validation_folder=VALIDATION_DIR, validation_split=0)
    evaluate = params.setdefault("evaluate", {})
    check = float(evaluate.get("check_weight", 1.2))  # its overfit rises need weights 0 and check_weight
    evaluate.update(steps=args.evaluate_steps, weights=sorted({0.0, 1.0, check}))  # the demo's prompts and seeds
    if args.threads:
        params.setdefault("runner", {})["threads"] = args.threads
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return params


def run_pipeline(project: Path) -> dict[str, float]:
    """Run every stage in-process, in order; the seconds each took (printed as they finish)."""
    from loraforge.pipeline.runner import run_stage

    seconds = {}
    for name in STAGES:
        start = time.perf_counter()
        run_stage(project, name)
        seconds[name] = time.perf_counter() - start
        print(f"  {name:<9} {seconds[name]:7.1f} s", flush=True)
    print(f"  {'total':<9} {sum(seconds.values()):7.1f} s")
    return seconds


# ---------------------------------------------------------------- rendering and reading


@dataclass(frozen=True)
class Groups:
    """The prompts every model is judged on.

    Attributes:
        seen: scenes of combinations pretraining saw (style, bleed and seen faithfulness).
        held: scenes of `HELD_OUT` combinations, cycled (faithfulness on what pretraining never showed).
        trigger: the caption trigger, appended last as in the demo's captions.
    """

    seen: list[Scene]
    held: list[Scene]
    trigger: str

    @classmethod
    def make(cls, count: int, trigger: str) -> Groups:
        held = [Scene(*combo) for combo in sorted(HELD_OUT)]
        return cls(list(scenes(SEEN_SEED, count, held_out=False)), [held[i % len(held)] for i in range(count)], trigger)

    def prompts(self, group: str) -> list[str]:
        """`style` (seen + trigger), `bleed` (seen, no trigger) or `held` (held out + trigger)."""
        if group == "bleed":
            return [s.caption for s in self.seen]
        return [f"{s.caption}, {self.trigger}" for s in (self.held if group == "held" else self.seen)]


def render_groups(pipe: Any, groups: Groups, names: tuple[str, ...], scale: float | None, seed: int) -> dict[str, list]:
    """Render the named groups in one batch; image i of every group has seed `seed + i`.

    Args:
        pipe: the diffusers pipeline (a LoRA loaded or not).
        groups: the prompts.
        names: which groups.
        scale: the LoRA weight (`cross_attention_kwargs` scale: UNet and text encoders); None = no LoRA.
        seed: the first image's seed.
    """
    prompts = [p for name in names for p in groups.prompts(name)]
    generators = [torch.Generator().manual_seed(seed + i) for name in names for i in range(len(groups.prompts(name)))]
    extra = {} if scale is None else {"cross_attention_kwargs": {"scale": scale}}
    images = pipe(
        prompts,
        num_inference_steps=STEPS,
        guidance_scale=GUIDANCE,
        height=SIZE,
        width=SIZE,
        generator=generators,
        **extra,
    ).images
    out, start = {}, 0
    for name in names:
        n = len(groups.prompts(name))
        out[name], start = images[start : start + n], start + n
    return out


def oracle_scores(images: dict[str, list], groups: Groups) -> dict[str, float]:
    """The oracle's measures of rendered groups (those present): `style` (and its standard error
    `style_se`), `bleed`, `faithful_seen`, `held`."""
    out: dict[str, float] = {}
    if "style" in images:
        readings = [read(im) for im in images["style"]]
        out["style"] = float(np.mean([r.style for r in readings]))
        out["style_se"] = float(np.std([r.style for r in readings], ddof=1) / np.sqrt(len(readings)))
        out["faithful_seen"] = float(np.mean([r.faithful_to(s) for r, s in zip(readings, groups.seen)]))
    if "bleed" in images:
        out["bleed"] = float(np.mean([read(im).style for im in images["bleed"]]))
    if "held" in images:
        out["held"] = float(np.mean([read(im).faithful_to(s) for im, s in zip(images["held"], groups.held)]))
    return out


def pixel_difference(a: list, b: list) -> float:
    """Mean absolute pixel difference (0-255) of two equally long lists of images."""
    return float(np.mean([np.abs(np.asarray(x, np.float32) - np.asarray(y, np.float32)).mean() for x, y in zip(a, b)]))


def load_base(project: Path, params: dict[str, Any], device: torch.device) -> tuple[Any, Any]:
    """(ModelInfo, a fresh pipeline) of the project's base model."""
    from loraforge.models.loading import load_pipeline, resolve_model
    from loraforge.pipeline.params import ModelParams

    info = resolve_model(ModelParams(**params["model"]), project / ".loraforge")
    pipe = load_pipeline(info, device)
    pipe.set_progress_bar_config(disable=True)
    return info, pipe


def with_lora(pipe: Any, lora: Path, groups: Groups, names: tuple[str, ...], weights: list[float], seed: int) -> dict:
    """Per weight, the oracle's scores and the images of `lora` loaded into `pipe` (unloaded after)."""
    pipe.load_lora_weights(str(lora.parent), weight_name=lora.name)
    try:
        out = {}
        for w in weights:
            images = render_groups(pipe, groups, names, w, seed)
            out[w] = {"images": images, **oracle_scores(images, groups)}
        return out
    finally:
        pipe.unload_lora_weights()


# ---------------------------------------------------------------- the pipeline's reports


def tsv_column(path: Path, column: str) -> dict[int, float]:
    """`column` per epoch of a finetune TSV report (empty when the file or the column is absent)."""
    if not path.is_file():
        return {}
    lines = path.read_text().splitlines()
    header = lines[0].split("\t")
    if column not in header or "epoch" not in header:
        return {}
    rows = [dict(zip(header, line.split("\t"))) for line in lines[1:] if line]
    return {int(r["epoch"]): float(r[column]) for r in rows if r.get(column) not in (None, "")}


def epoch_reports(project: Path) -> dict[int, dict[str, Any]]:
    """Per saved epoch: evaluate's `memorisation` / `memorisation_base`, and finetune's losses."""
    metrics = json.loads((project / "reports/eval/metrics.json").read_text())["epochs"]
    loss = tsv_column(project / "reports/finetune/epochs.tsv", "loss")
    validation = tsv_column(project / "reports/finetune/validation.tsv", "validation_loss")
    return {
        row["epoch"]: {
            "memorisation": row.get("memorisation"),
            "memorisation_base": row.get("memorisation_base"),
            "validation_loss": validation.get(row["epoch"]),
            "loss": loss.get(row["epoch"]),
        }
        for row in metrics.values()
    }


def lora_epochs(project: Path) -> dict[int, Path]:
    """The pipeline's per-epoch LoRAs (`models/loras`, what evaluate judged) by epoch number."""
    return {
        int(p.stem.rsplit("-", 1)[-1]): p for p in sorted((project / "models/loras").glob("lora-epoch-*.safetensors"))
    }


# ---------------------------------------------------------------- tables


def cell(value: Any) -> str:
    """A table cell: floats to 3 decimals, None as `-`."""
    if value is None:
        return "-"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def print_table(headers: list[str], rows: list[list[Any]]) -> None:
    """Right-aligned plain-text table."""
    cells = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    print("  ".join(h.rjust(w) for h, w in zip(headers, widths)))
    for row in cells:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)))


def sweep_table(base: dict[str, float], sweep: dict[int, dict], reports: dict[int, dict], weights: list[float]) -> None:
    """Table 1: per saved epoch and weight; the per-epoch reports on each epoch's first row."""
    headers = ["epoch", "weight", "style", "bleed", "faith_seen", "faith_held", "memo", "memo_base", "val_loss", "loss"]
    rows: list[list[Any]] = [
        ["base", 0.0, base["style"], base["bleed"], base["faithful_seen"], base["held"]] + [None] * 4
    ]
    for epoch, per_weight in sweep.items():
        rep = reports.get(epoch, {})
        for i, w in enumerate(x for x in weights if x > 0):
            s = per_weight[w]
            per_epoch = [rep.get(k) for k in ("memorisation", "memorisation_base", "validation_loss", "loss")]
            rows.append(
                [epoch if i == 0 else "", w, s["style"], s["bleed"], s["faithful_seen"], s["held"]]
                + (per_epoch if i == 0 else [""] * 4)
            )
    print_table(headers, rows)


def meets_limits(base: dict[str, float], at_one: dict[str, float]) -> bool:
    """Whether an epoch's scores at weight 1 keep held-out faithfulness and do not bleed."""
    return at_one["held"] >= base["held"] - FAITHFUL_DROP and at_one["bleed"] <= MAX_BLEED


def oracle_best(base: dict[str, float], sweep: dict[int, dict]) -> int | None:
    """The highest style at weight 1 among epochs that keep held-out faithfulness and do not bleed."""
    ok = [e for e, per_weight in sweep.items() if meets_limits(base, per_weight[1.0])]
    return max(ok, key=lambda e: (sweep[e][1.0]["style"], -e)) if ok else None


def oracle_ties(base: dict[str, float], sweep: dict[int, dict], best: int) -> list[int]:
    """The epochs meeting the oracle rule's limits whose style at weight 1 is within one standard
    error (the best epoch's) of the best: what the oracle cannot tell apart at this prompt count."""
    top = sweep[best][1.0]
    return [
        e
        for e, per_weight in sweep.items()
        if meets_limits(base, per_weight[1.0]) and per_weight[1.0]["style"] >= top["style"] - top["style_se"]
    ]


def compare_best(project: Path, base: dict[str, float], sweep: dict[int, dict]) -> int:
    """Table 2: evaluate's recommendation beside the oracle's best; returns the epoch section 3 uses."""
    best = json.loads((project / "reports/eval/best.json").read_text())
    recommended = int(best.get("epoch_number") or str(best["epoch"]).rsplit("-", 1)[-1])
    print(
        "oracle best = the highest mean triggered style at weight 1 among the epochs whose held-out faithfulness at "
        f"weight 1 is >= base faithfulness - {FAITHFUL_DROP} (base: {base['held']:.3f}) and whose untriggered bleed "
        f"at weight 1 is <= {MAX_BLEED}"
    )
    chosen = oracle_best(base, sweep)
    saved = list(sweep)
    rows = [["evaluate (best.json)", recommended, sweep[recommended][1.0]["style"], sweep[recommended][1.0]["held"]]]
    if chosen is None:
        print("oracle best: no epoch meets the rule; section 3 uses the epoch of the highest style at weight 1")
    else:
        rows.append(["oracle", chosen, sweep[chosen][1.0]["style"], sweep[chosen][1.0]["held"]])
    print_table(["who", "epoch", "style@1", "held@1"], rows)
    for line in best.get("reasons", []):
        print(f"  evaluate: {line}")
    if chosen is not None:
        print(
            f"gap (evaluate - oracle): {recommended - chosen:+d} epochs, "
            f"{saved.index(recommended) - saved.index(chosen):+d} saved checkpoints"
        )
        ties = oracle_ties(base, sweep, chosen)
        nearest = min(ties, key=lambda e: abs(saved.index(recommended) - saved.index(e)))
        print(
            f"oracle ties (style@1 within one standard error, {sweep[chosen][1.0]['style_se']:.3f}, of the best, "
            f"limits met): epochs {', '.join(map(str, ties))}; evaluate to the nearest tie: "
            f"{saved.index(recommended) - saved.index(nearest):+d} saved checkpoints"
        )
    return chosen if chosen is not None else max(sweep, key=lambda e: sweep[e][1.0]["style"])


# ---------------------------------------------------------------- extraction and resize ranks


def load_checkpoint(pipe: Any, folder: Path) -> list[str]:
    """Load an epoch folder's `<component>.safetensors` into `pipe`; returns the components loaded."""
    from safetensors.torch import load_file

    loaded = []
    for component in COMPONENTS:
        path = folder / f"{component}.safetensors"
        if not path.is_file():
            continue
        result = getattr(pipe, component).load_state_dict(load_file(str(path)), strict=False)
        if result.unexpected_keys:
            raise ValueError(f"{path}: keys the pipeline's {component} lacks, e.g. {result.unexpected_keys[:3]}")
        loaded.append(component)
    return loaded


def full_rank(folder: Path) -> int:
    """The largest full rank of any 2D+ weight in the checkpoint (a dim that caps at every layer's)."""
    from safetensors import safe_open

    rank = 1
    for component in COMPONENTS:
        path = folder / f"{component}.safetensors"
        if path.is_file():
            with safe_open(str(path), "pt") as f:
                for key in f.keys():
                    shape = f.get_slice(key).get_shape()
                    if len(shape) >= 2:
                        rank = max(rank, min(shape[0], int(np.prod(shape[1:]))))
    return rank


def extract(info: Any, folder: Path, dim: int, extract_params: dict[str, Any], device: torch.device) -> dict:
    """The LoRA tensors of a checkpoint folder at `dim` (conv_dim = dim), the other settings the stage's."""
    from loraforge.lora.extraction import ExtractSettings, extract_component
    from loraforge.models.loading import weight_files

    keys = ("clamp_quantile", "min_diff", "save_dtype", "svd")
    settings = ExtractSettings(dim=dim, conv_dim=dim, **{k: extract_params[k] for k in keys if k in extract_params})
    unet_config = json.loads((info.path / "unet" / "config.json").read_text(encoding="utf-8"))
    tensors: dict[str, Any] = {}
    for component in COMPONENTS:
        tuned = folder / f"{component}.safetensors"
        if tuned.is_file():
            part, _ = extract_component(
                info.arch,
                component,
                weight_files(info, component),
                [tuned],
                settings,
                device,
                unet_config,
                log=lambda s: None,
            )
            tensors.update(part)
    return tensors


def lora_variants(
    info: Any, folder: Path, args: argparse.Namespace, params: dict, out: Path
) -> Iterator[tuple[str, Path]]:
    """(label, file) of every extracted rank, then of every resize of the largest one."""
    from loraforge.lora.format import save_lora
    from loraforge.lora.resize import resize_lora

    full = full_rank(folder)
    dims = {label: full if label == "full" else int(label) for label in args.dims.split(",")}
    top = max(dims, key=lambda label: dims[label])  # resized from
    device = torch.device(args.device)
    source: dict[str, Any] = {}
    for label, dim in dims.items():
        tensors = extract(info, folder, dim, params.get("extract", {}), device)
        source = tensors if label == top else source
        path = save_lora(out / f"extract-{label}.safetensors", tensors, {}, hashes=False)
        yield f"extract {label}" + (f" ({dim})" if label == "full" else ""), path
    for rank in [int(r) for r in args.resize_ranks.split(",") if r]:
        tensors, _ = resize_lora(source, rank, device=device)
        yield f"resize {top}->{rank}", save_lora(out / f"resize-{rank}.safetensors", tensors, {}, hashes=False)


def rank_table(project: Path, params: dict, epoch: int, groups: Groups, args: argparse.Namespace) -> None:
    """Table 3: each extracted and resized LoRA of `epoch`'s checkpoint against the full finetune."""
    device = torch.device(args.device)
    folder = project / "models/checkpoints" / f"epoch-{epoch:04d}"
    if params.get("extract", {}).get("from_ema"):
        folder = folder / "ema"
    if not (folder / "unet.safetensors").is_file():
        print(f"{folder} holds no unet.safetensors (finetune.mode lora?): no extraction ranks")
        return
    info, pipe = load_base(project, params, device)
    base = render_groups(pipe, groups, ("style",), None, args.seed)["style"]
    tuned_pipe = load_base(project, params, device)[1]
    print(f"checkpoint {folder.relative_to(project)}: loaded {', '.join(load_checkpoint(tuned_pipe, folder))}")
    tuned = render_groups(tuned_pipe, groups, ("style",), None, args.seed)["style"]
    del tuned_pipe
    rows = [
        ["finetune (full weights)", None, 0.0, oracle_scores({"style": tuned}, groups)["style"]],
        ["base (no LoRA)", None, pixel_difference(base, tuned), oracle_scores({"style": base}, groups)["style"]],
    ]
    shipped = lora_epochs(project).get(epoch)
    stage = f"pipeline: extract {params['extract'].get('dim')} -> resize {params['resize'].get('rank')}"
    variants = [(stage, shipped)] if shipped else []
    with tempfile.TemporaryDirectory() as tmp:
        for label, path in [*variants, *lora_variants(info, folder, args, params, Path(tmp))]:
            result = with_lora(pipe, path, groups, ("style",), [1.0], args.seed)[1.0]
            diff = pixel_difference(result["images"]["style"], tuned)
            rows.append([label, path.stat().st_size / 1e6, diff, result["style"]])
            print(f"  {label}: done", file=sys.stderr, flush=True)
    print_table(["model", "MB", "diff_to_finetune", "style"], rows)
    print(
        "diff_to_finetune: mean |render - finetune's render| (0-255), same prompt and seed; `full` applies the "
        "finetune's change of every LoRA-carrying layer exactly: what it leaves is the change of the other weights "
        "(biases, norms, embeddings)"
    )


# ---------------------------------------------------------------- main


def weight_sweep(project: Path, params: dict, groups: Groups, weights: list[float], args: argparse.Namespace) -> tuple:
    """(base scores, per epoch {weight: scores}) of the pipeline's per-epoch LoRAs."""
    _, pipe = load_base(project, params, torch.device(args.device))
    names = ("style", "bleed", "held")
    base = oracle_scores(render_groups(pipe, groups, names, None, args.seed), groups)
    sweep = {}
    for epoch, lora in lora_epochs(project).items():
        per_weight = with_lora(pipe, lora, groups, names, [w for w in weights if w > 0], args.seed)
        sweep[epoch] = {w: {k: v for k, v in r.items() if k != "images"} for w, r in per_weight.items()}
    return base, sweep


def parse_args() -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--epochs", type=int, default=160, help="finetune.epochs (the demo's; long enough to over-train)"
    )
    parser.add_argument("--every", type=int, default=20, help="finetune.save_every_n_epochs (the demo's)")
    parser.add_argument("--prompts", type=int, default=16, help="prompts per group (style, bleed, held out)")
    parser.add_argument("--weights", default="0,0.5,1,1.5", help="LoRA weights of table 1 (0 and 1 always)")
    parser.add_argument(
        "--validation", type=int, default=0, help="write this many validation images (0: params.yaml's folder)"
    )
    parser.add_argument("--evaluate-steps", type=int, default=12, help="evaluate.steps (its renders are cheap)")
    parser.add_argument("--dims", default="4,8,16,32,64,full", help="extraction ranks of table 3")
    parser.add_argument("--resize-ranks", default="4,8,16", help="resize ranks of table 3 (from the largest dim)")
    parser.add_argument("--seed", type=int, default=0, help="the first render seed (image i: seed + i)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="benchmark renders")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (also runner.threads); 0: torch's default"
    )
    parser.add_argument("--keep", type=Path, default=None, help="build the project here and keep it")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    weights = sorted({float(w) for w in args.weights.split(",")} | {0.0, 1.0})
    started = time.perf_counter()
    tmp = None if args.keep else tempfile.TemporaryDirectory(prefix="loraforge-quality-")
    project = copy_project((args.keep or Path(tmp.name)).resolve())  # type: ignore[union-attr]
    params = configure(project, args)
    finetune = params["finetune"]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, renders on {args.device}; project {project}")
    print(
        f"base {BASE}, epochs {args.epochs} (saved every {args.every}), reg_images {finetune.get('reg_images')}, "
        f"validation_folder {finetune.get('validation_folder')}, "
        f"train_text_encoder {finetune.get('train_text_encoder')}, "
        f"caption.trigger_position {params['caption'].get('trigger_position')}"
    )
    print("\nstage times:")
    run_pipeline(project)
    groups = Groups.make(args.prompts, params["caption"]["trigger"])
    print(
        f"\n1. per saved epoch and weight ({args.prompts} prompts per group, {SIZE} px, {STEPS} steps, cfg {GUIDANCE}):"
    )
    print("   style/bleed: oracle style 0..1 with/without the trigger; faith_*: colour+background right (share);")
    print("   memo: evaluate's memorisation (weight 1; memo_base weight 0); val_loss, loss: finetune's")
    base, sweep = weight_sweep(project, params, groups, weights, args)
    sweep_table(base, sweep, epoch_reports(project), weights)
    print("\n2. recommended epoch:")
    epoch = compare_best(project, base, sweep)
    print(f"\n3. extraction and resize ranks of epoch {epoch}'s checkpoint (weight 1, triggered prompts):")
    rank_table(project, params, epoch, groups, args)
    print(f"\ntotal {time.perf_counter() - started:.0f} s" + (f"; project kept in {project}" if args.keep else ""))
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
