"""Evaluation (issue #6): measured signs on synthetic images, the recommendation rule on
synthetic series, and the evaluate stage for real on tiny SD1.5 (grids, metrics, best.json,
the best LoRA, per-epoch reuse, CLIP, Prefect artifacts, the page in headless Chromium)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from loraforge.evaluation import metrics as em
from loraforge.evaluation import render
from loraforge.evaluation.embedding import Embedder
from loraforge.pipeline.runner import run_stage
from stages import evaluate
from tests.browser import INSTALL_HINT, Browser, find_chromium
from tests.evalproject import eval_project
from tests.helpers import set_params

STAGES = ["ingest", "upscale", "caption", "latents", "finetune", "extract", "resize"]


# ---------------------------------------------------------------- measured signs


def rgb(array: Any) -> np.ndarray:
    return np.asarray(array, dtype=np.float32)


def test_colourfulness_is_zero_for_grey_and_rises_with_saturation():
    grey = rgb(np.full((8, 8, 3), 128))
    half = np.zeros((8, 8, 3))
    half[:, :4] = (200, 60, 60)
    half[:, 4:] = (60, 60, 200)
    full = np.zeros((8, 8, 3))
    full[:, :4] = (255, 0, 0)
    full[:, 4:] = (0, 0, 255)
    assert em.colourfulness(grey) == 0.0
    assert em.colourfulness(rgb(half)) < em.colourfulness(rgb(full))
    # Hasler & Süsstrunk by hand: rg = (140, 0), yb = (70, −140) for `half`; (255, 0), (127.5, −255) for `full`
    assert em.colourfulness(rgb(half)) == pytest.approx((math.hypot(70, 105) + 0.3 * math.hypot(70, 35)) / 255)
    assert em.colourfulness(rgb(full)) == pytest.approx(
        (math.hypot(127.5, 191.25) + 0.3 * math.hypot(127.5, 63.75)) / 255
    )


def test_clipped_share_counts_pixels_with_any_channel_at_the_ends():
    img = np.full((4, 4, 3), 128.0)
    img[0, 0] = (255, 128, 128)
    img[1, 1] = (0, 0, 0)
    img[2, 2] = (3, 252, 128)  # inside the limits
    assert em.clipped_share(img) == pytest.approx(2 / 16)


def test_high_frequency_share_separates_noise_from_smooth_gradients():
    ramp = np.tile(np.linspace(0, 255, 32, dtype=np.float32), (32, 1))
    smooth = np.stack([ramp] * 3, axis=-1)
    noise = np.random.default_rng(0).uniform(0, 255, (32, 32, 3)).astype(np.float32)
    assert em.high_frequency_share(smooth) < 0.01 < 0.5 < em.high_frequency_share(noise)
    # a ramp of step d is its own 3×3 blur except the two edge columns (off by d/3): (2·32·d²/9) / 32²
    # over the ramp's variance d²(32² − 1)/12
    assert em.high_frequency_share(smooth) == pytest.approx(1 / (12 * 1023), rel=1e-4)
    assert em.high_frequency_share(np.full((8, 8, 3), 7.0)) == 0.0


def test_rises_are_relative_for_colour_and_detail_and_absolute_for_clipping():
    r = em.rises(
        {"colourfulness": 0.3, "high_freq": 0.1, "clipped": 0.12},
        {"colourfulness": 0.2, "high_freq": 0.1, "clipped": 0.02},
    )
    assert r == pytest.approx({"saturation_rise": 0.5, "high_freq_rise": 0.0, "clipped_rise": 0.10})


def test_rises_start_from_the_training_images_where_they_are_more_vivid_than_the_base():
    at_weight = {"colourfulness": 0.3, "high_freq": 0.1, "clipped": 0.12}
    base = {"colourfulness": 0.2, "high_freq": 0.1, "clipped": 0.02}
    vivid = {"colourfulness": 0.25, "high_freq": 0.05, "clipped": 0.10}  # a saturated style's own level
    r = em.rises(at_weight, base, vivid)
    assert r == pytest.approx({"saturation_rise": 0.2, "high_freq_rise": 0.0, "clipped_rise": 0.02})
    assert em.rises(at_weight, base, {k: 0.0 for k in base}) == em.rises(at_weight, base)  # dull: the base


def test_pixel_embedding_matches_the_same_picture_and_not_another():
    rng = np.random.default_rng(1)
    a = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    b = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    refs = np.stack([em.pixel_embedding(a), em.pixel_embedding(b)])
    assert np.linalg.norm(refs, axis=1) == pytest.approx([1.0, 1.0])
    assert em.nearest_distance(em.pixel_embedding(a), refs) == pytest.approx(0.0, abs=1e-6)
    assert em.nearest_distance(em.pixel_embedding(a.resize((48, 48))), refs) < 0.1
    assert em.nearest_distance(em.pixel_embedding(a), refs[1:]) > 0.5
    with pytest.raises(ValueError, match="references"):
        em.nearest_distance(refs[0], refs[:0])


def test_centroid_similarity_is_higher_for_images_like_the_training_set():
    train = em.unit(np.array([[1.0, 0.1, 0.0], [1.0, -0.1, 0.0]]))
    like, unlike = em.unit(np.array([[1.0, 0.0, 0.0]])), em.unit(np.array([[0.0, 0.0, 1.0]]))
    assert em.centroid_similarity(like, train) == pytest.approx(1.0)
    assert em.centroid_similarity(unlike, train) == pytest.approx(0.0)


def test_local_minima_are_lows_before_a_rise_and_never_the_last_epoch():
    assert em.local_minima({1: 1.0, 2: 0.8, 3: 0.9, 4: 0.7, 5: 0.75, 6: 0.6}) == [2, 4]
    assert em.local_minima({1: 1.0, 2: 0.9, 3: 0.8}) == []


# ---------------------------------------------------------------- the rule, on synthetic series


def series(n: int, **columns: list[float | None]) -> list[dict[str, Any]]:
    """Rows for epochs 1..n; a column's missing values fall back to harmless numbers."""
    defaults = {
        "loss": [1.0 - 0.05 * e for e in range(n)],
        "memorisation": [0.8] * n,
        "memorisation_base": [0.8] * n,
        "saturation_rise": [0.0] * n,
        "high_freq_rise": [0.0] * n,
        "clipped_rise": [0.0] * n,
    }
    cols = {**defaults, **columns}
    return [{"epoch": e + 1, **{k: v[e] for k, v in cols.items()}} for e in range(n)]


def test_rule_ships_the_last_epoch_before_memorisation_and_says_why():
    rows = series(8, memorisation=[0.8, 0.75, 0.7, 0.6, 0.5, 0.45, 0.3, 0.2])  # base 0.8: limit 0.4 at ratio 0.5
    best = em.recommend(rows, em.Limits())
    assert best["epoch"] == 6 and best["memorising_from"] == 7 and not best["fallback"]
    assert "before epoch 7" in best["reasons"][0] and "no saturation or artefacts at weight 1.2" in best["reasons"][1]


def test_rule_skips_epochs_that_saturate_at_the_check_weight():
    rows = series(5, saturation_rise=[0.0, 0.1, 0.2, 0.4, 0.6])
    best = em.recommend(rows, em.Limits(saturation_rise=0.25))
    assert best["epoch"] == 3
    assert best["overfit"] == {4: ["saturation_rise 0.4 > 0.25"], 5: ["saturation_rise 0.6 > 0.25"]}
    assert any("skipped for overfit signs: epochs 4, 5" in r for r in best["reasons"])


def test_rule_prefers_the_latest_loss_minimum_among_passing_epochs():
    rows = series(6, loss=[1.0, 0.8, 0.9, 0.7, 0.75, 0.6])  # minima 2 and 4; 6 is last, not a minimum
    assert em.recommend(rows, em.Limits())["epoch"] == 4
    rows = series(6, loss=[1.0, 0.8, 0.9, 0.7, 0.75, 0.6], clipped_rise=[0, 0, 0, 0.2, 0, 0])
    best = em.recommend(rows, em.Limits())
    assert best["epoch"] == 2 and "local minimum" in best["reasons"][-1]


def test_rule_prefers_the_highest_likeness_gain_over_the_validation_loss():
    rows = series(
        5,
        likeness=[0.10, 0.30, 0.45, 0.40, 0.50],
        likeness_base=[0.10] * 5,
        validation_loss=[0.30, 0.31, 0.32, 0.33, 0.34],  # lowest first: the style is not there yet
        saturation_rise=[0, 0, 0, 0, 0.4],  # the most alike epoch saturates: skipped
    )
    best = em.recommend(rows, em.Limits())
    assert best["epoch"] == 3 and "the highest likeness gain of the epochs that passed (+0.35" in best["reasons"][-1]
    rows[1]["likeness"] = rows[2]["likeness"]  # equal gains: the earlier epoch
    assert em.recommend(rows, em.Limits())["epoch"] == 2


def test_rule_without_a_likeness_gain_falls_back_to_the_validation_loss_and_says_so():
    rows = series(3, likeness=[0.05, 0.08, 0.1], likeness_base=[0.1] * 3, validation_loss=[0.3, 0.2, 0.25])
    best = em.recommend(rows, em.Limits())
    assert best["epoch"] == 2
    assert best["reasons"][-2:] == [
        "no passing epoch's renders came closer to the training images than the base model's",
        "the lowest validation loss of the epochs that passed (0.2)",
    ]


def test_rule_falls_back_to_the_earliest_epoch_when_all_overtrain():
    rows = series(3, high_freq_rise=[0.5, 0.6, 0.9])
    best = em.recommend(rows, em.Limits())
    assert best["epoch"] == 1 and best["fallback"] and "every epoch shows overtraining" in best["reasons"][0]


def test_rule_without_measurements_ships_the_latest_epoch_and_says_what_was_not_measured():
    rows = [{"epoch": 2}, {"epoch": 4}]
    best = em.recommend(rows, em.Limits())
    assert best["epoch"] == 4
    assert "memorisation not measured" in best["reasons"][0] and "overfit signs not measured" in best["reasons"][1]
    with pytest.raises(ValueError, match="rows"):
        em.recommend([], em.Limits())


# ---------------------------------------------------------------- what is rendered


def test_random_prompts_and_seeds_depend_only_on_the_params():
    params = evaluate.Params(model={}, random_prompts=3, random_seed=7)
    shots = evaluate.shots_of(params, [], "lfx").randoms
    assert shots == evaluate.shots_of(params, [], "lfx").randoms and len(shots) == 3
    assert shots == render.random_shots(params.random_pool, 3, 7, "lfx")
    assert all(p.startswith("lfx, ") and p.removeprefix("lfx, ") in params.random_pool for p, _ in shots)
    other = evaluate.Params(model={}, random_prompts=3, random_seed=8)
    assert shots != evaluate.shots_of(other, [], "lfx").randoms


def test_random_template_puts_the_trigger_where_the_captions_have_it():
    params = evaluate.Params(model={}, random_prompts=3, random_seed=7, random_template="{subject}, {trigger}")
    shots = evaluate.shots_of(params, [], "lfx").randoms
    assert all(p.endswith(", lfx") and p.removesuffix(", lfx") in params.random_pool for p, _ in shots)
    default = evaluate.Params(model={}, random_prompts=3, random_seed=7)
    seeds = [s for _, s in evaluate.shots_of(default, [], "lfx").randoms]
    assert [s for _, s in shots] == seeds  # the same draw, only the wording differs
    with pytest.raises(ValueError, match="subject"):
        evaluate.Params(model={}, random_template="{trigger} alone")


def test_params_refuse_negative_weights_and_empty_sweeps():
    from loraforge.pipeline.params import validate_stage
    from loraforge.pipeline.spec import load_pipeline
    from tests.helpers import REPO

    stage = load_pipeline(REPO).stages["evaluate"]
    _, problems = validate_stage(stage, {"evaluate": {"weights": [0.0, -1.0]}})
    assert any("evaluate.weights" in p and "≥ 0" in p for p in problems)
    _, problems = validate_stage(stage, {"evaluate": {"weights": []}})
    assert any("evaluate.weights" in p for p in problems)
    with pytest.raises(ValueError, match="lora-epoch-0007"):
        evaluate.epoch_number(Path("lora-final.safetensors"))


def test_lora_identity_is_its_tensors_not_its_metadata(tmp_path):
    from safetensors.torch import save_file

    tensors = {"lora_unet_x.lora_down.weight": torch.ones(2, 3), "lora_unet_x.alpha": torch.tensor(2.0)}
    save_file(tensors, str(tmp_path / "a.safetensors"), metadata={"modelspec.date": "2026-01-01"})
    save_file(tensors, str(tmp_path / "b.safetensors"), metadata={"modelspec.date": "2026-01-02"})
    save_file({**tensors, "lora_unet_x.alpha": torch.tensor(3.0)}, str(tmp_path / "c.safetensors"))
    a, b, c = (render.lora_content_hash(tmp_path / f"{n}.safetensors") for n in "abc")
    assert a == b != c
    (tmp_path / "bad.safetensors").write_bytes(b"abc")
    with pytest.raises(ValueError, match="bad.safetensors: not a safetensors file"):
        render.lora_content_hash(tmp_path / "bad.safetensors")


# ---------------------------------------------------------------- the stage, for real


class Recorder:
    """A publisher that keeps what the stage publishes (stands in for Prefect)."""

    def __init__(self) -> None:
        self.tables: dict[str, list[dict[str, Any]]] = {}
        self.markdowns: dict[str, str] = {}
        self.progress_values: list[float] = []

    def table(self, key: str, rows: list[dict[str, Any]], description: str = "") -> None:
        self.tables[key] = rows

    def markdown(self, key: str, text: str, description: str = "") -> None:
        self.markdowns[key] = text

    def progress(self, fraction: float, description: str = "") -> None:
        self.progress_values.append(fraction)


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny SD1.5, 2 saved epochs, evaluated once (with a Prefect-like recorder)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny models gain nothing from threads on a busy 2-core box
    root = eval_project(tmp_path_factory.mktemp("eval") / "p")
    set_params(
        root,
        {
            "model": {"base": "builtin:tiny-sd15"},
            "finetune": {"epochs": 2, "save_every_n_epochs": 1, "save_dtype": "float32"},
            "extract": {"save_dtype": "float32"},
            "resize": {"save_dtype": "float32"},
        },
    )
    for stage in STAGES:
        run_stage(root, stage)
    recorder = Recorder()
    run_stage(root, "evaluate", publish=recorder)
    root.joinpath("recorder.json").write_text(json.dumps(vars(recorder)))
    yield root
    torch.set_num_threads(threads)


def report(root: Path) -> dict[str, Any]:
    return json.loads((root / "reports" / "evaluate.json").read_text())


def grid_cells(path: Path, side: int = 64) -> list[list[Image.Image]]:
    """A grid PNG cut back into its cells, row by row: the renders, pixel for pixel (PNG is lossless)."""
    with Image.open(path) as img:
        grid = img.convert("RGB")
    cols, rows = grid.width // side, grid.height // side
    return [[grid.crop((c * side, r * side, (c + 1) * side, (r + 1) * side)) for c in range(cols)] for r in range(rows)]


def expected_signs(root: Path, epoch: str, embedder: Embedder) -> dict[str, float]:
    """An epoch's LoRA effect, memorisation, likeness (and with CLIP, CLIP score) recomputed from its
    grids and the training images, for EVAL_PARAMS: weights 0, 1, 1.2; seed 1; one caption."""
    from loraforge.data.images import read_jsonl

    grids = root / "reports" / "eval" / "grids"
    sweep = grid_cells(grids / f"{epoch}.png")  # rows: prompt 1, prompt 2; columns: weight 0, 1, 1.2
    captions = grid_cells(grids / f"{epoch}-captions.png")[0]  # training image, weight 0, weight 1
    randoms = grid_cells(grids / f"{epoch}-random.png")  # rows: random prompts; columns: weight 0, weight 1
    liked = {w: [row[col] for row in sweep] + [row[col] for row in randoms] for w, col in ((1, 1), (0, 0))}
    train_paths = evaluate.training_images(root / "data" / "upscaled")
    train = embedder.images([Image.open(p).convert("RGB") for p in train_paths.values()])
    at = {col: em.mean_signs([em.image_signs(em.as_array(row[col])) for row in sweep]) for col in (0, 2)}
    out = {
        "lora_effect": float(np.mean([em.mean_abs_difference(em.as_array(r[0]), em.as_array(r[2])) for r in sweep])),
        "memorisation": em.nearest_distance(embedder.images([captions[2]])[0], train),
        "memorisation_base": em.nearest_distance(embedder.images([captions[1]])[0], train),
        "likeness": em.centroid_similarity(embedder.images(liked[1]), train),  # every fixed and random render
        "likeness_base": em.centroid_similarity(embedder.images(liked[0]), train),
        **em.rises(at[2], at[0], evaluate.training_signs(train_paths, 64)),  # weight 1.2 vs 0 or the training set
    }
    if embedder.has_text:
        trigger = read_jsonl(root / "data" / "captions" / "manifest.jsonl")[0]["trigger"]
        texts = embedder.texts(render.render_prompts(evaluate.Params(model={}).prompts, trigger))
        for key, col in (("clip_score", 1), ("clip_score_base", 0)):
            emb = embedder.images([row[col] for row in sweep])
            out[key] = float(np.mean([100 * max(float(e @ t), 0.0) for e, t in zip(emb, texts)]))
    return out


def test_best_json_names_an_epoch_with_reasons_and_the_best_lora_is_that_file(project):
    best = json.loads((project / "reports" / "eval" / "best.json").read_text())
    metrics = json.loads((project / "reports" / "eval" / "metrics.json").read_text())
    expected = em.recommend(list(metrics["epochs"].values()), em.Limits(**best["limits"]))  # the rule, on the rows
    assert best["epoch"] == f"epoch-{expected['epoch']:04d}" and best["epoch_number"] == expected["epoch"]
    assert best["lora"] == f"lora-{best['epoch']}.safetensors"
    assert best["reasons"] == expected["reasons"] and len(best["reasons"]) >= 3
    assert best["reasons"][0].startswith(f"epoch {best['epoch_number']}:")
    assert best["similarity"] == "pixels-16x16" and best["limits"]["check_weight"] == 1.2
    shipped = (project / "models" / "lora-best.safetensors").read_bytes()
    assert shipped == (project / "models" / "loras" / best["lora"]).read_bytes()


def test_every_epoch_gets_the_three_grids_and_the_cross_epoch_grids(project):
    grids = project / "reports" / "eval" / "grids"
    names = sorted(p.name for p in grids.iterdir())
    assert names == [
        "epoch-0001-captions.png",
        "epoch-0001-random.png",
        "epoch-0001.png",
        "epoch-0002-captions.png",
        "epoch-0002-random.png",
        "epoch-0002.png",
        "prompt-1.png",
        "prompt-2.png",
    ]
    with (
        Image.open(grids / "epoch-0002.png") as sweep,
        Image.open(grids / "prompt-1.png") as cross,
        Image.open(grids / "epoch-0002-captions.png") as captions,
    ):
        assert sweep.size == (64 * 3, 64 * 2)  # columns: weights 0, 1, 1.2; rows: 2 prompts × 1 seed
        assert cross.size == (64 * 1, 64 * 2)  # columns: 1 seed; rows: 2 epochs
        assert captions.size == (64 * 3, 64 * 1)  # training image, weight 0, weight 1


def test_metrics_and_series_hold_every_measured_sign(project):
    metrics = json.loads((project / "reports" / "eval" / "metrics.json").read_text())
    best = json.loads((project / "reports" / "eval" / "best.json").read_text())
    assert metrics["similarity"] == "pixels-16x16" and metrics["best_epoch"] == best["epoch_number"]
    for name, row in metrics["epochs"].items():
        assert {
            "loss",
            "lora_effect",
            "saturation_rise",
            "high_freq_rise",
            "clipped_rise",
            "memorisation",
            "memorisation_base",
            "likeness",
            "likeness_base",
        } <= set(row)
        assert "clip_score" not in row
        expected = expected_signs(project, name, Embedder(None))
        assert {k: row[k] for k in expected} == pytest.approx(expected, rel=1e-5)
        assert row["lora_effect"] > 0  # the LoRA changes the images
    # the base model's values do not depend on the epoch
    bases = {row["memorisation_base"] for row in metrics["epochs"].values()}
    assert len(bases) == 1
    losses = (project / "reports" / "finetune" / "epochs.tsv").read_text().splitlines()[1:]
    assert [round(metrics["epochs"][f"epoch-000{i}"]["loss"], 4) for i in (1, 2)] == [
        round(float(l.split("\t")[1]), 4) for l in losses
    ]
    epochs_tsv = (project / "reports" / "eval" / "epochs.tsv").read_text().splitlines()
    assert epochs_tsv[0].startswith("epoch\tloss\t") and len(epochs_tsv) == 3
    weights_tsv = (project / "reports" / "eval" / "weights.tsv").read_text().splitlines()
    assert weights_tsv[0] == "epoch\tweight\tcolourfulness\tclipped\thigh_freq" and len(weights_tsv) == 1 + 2 * 3


def test_prefect_gets_the_metrics_table_the_recommendation_with_grid_links_and_progress(project):
    rec = json.loads((project / "recorder.json").read_text())
    assert [r["name"] for r in rec["tables"]["metrics"]] == ["epoch-0001", "epoch-0002"]
    text = rec["markdowns"]["recommendation"]
    assert text.startswith("## Recommended: epoch-000") and "grids/epoch-0002-random.png" in text and "file://" in text
    values = rec["progress_values"]  # per epoch: the images found in the store, then each chunk rendered
    assert values[-1] == pytest.approx(1.0) and values == sorted(values) and len(values) >= 2


def test_rerun_reuses_every_image(project):
    run_stage(project, "evaluate")
    r = report(project)
    assert r["computed"] == 0 and r["reused"] == r["items"] and r["epochs_computed"] == []


def test_one_more_epoch_renders_only_that_epochs_images(project, tmp_path):
    """A new epoch's LoRA (here: epoch 2's, scaled) adds its images; the others come from the store."""
    from safetensors.torch import load_file, save_file

    loras = project / "models" / "loras"
    src = loras / "lora-epoch-0002.safetensors"
    tensors = {k: (t * 1.5 if k.endswith("lora_up.weight") else t) for k, t in load_file(str(src)).items()}
    from safetensors import safe_open

    with safe_open(str(src), "pt") as f:
        meta = f.metadata()
    save_file(tensors, str(loras / "lora-epoch-0003.safetensors"), metadata=meta)
    try:
        run_stage(project, "evaluate")
        r = report(project)
        per_image = 2 * 1 * 3 + 2 * (1 + 1)  # fixed prompts × seeds × weights + (random + captions) × 2 weights
        assert r["epochs"] == ["epoch-0001", "epoch-0002", "epoch-0003"]
        assert r["per_epoch_computed"] == {
            "epoch-0001": 0,
            "epoch-0002": 0,
            "epoch-0003": per_image - 4,
        }  # 4 weight-0 images shared
        assert r["epochs_computed"] == ["epoch-0003"] and r["computed"] == per_image - 4
    finally:
        (loras / "lora-epoch-0003.safetensors").unlink()
        run_stage(project, "evaluate")


def tiny_clip(folder: Path) -> Path:
    """A random 1-layer CLIP (text + vision) with the shipped tiny tokenizer, saved to `folder`."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer
    import transformers

    from loraforge.models.tiny import TOKENIZER_DIR

    tok = CLIPTokenizer.from_pretrained(TOKENIZER_DIR)
    torch.manual_seed(0)
    text = dict(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=1,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    vision = dict(
        hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4, image_size=32, patch_size=8
    )
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(folder)
    tok.save_pretrained(folder)
    processor = getattr(transformers, "CLIPImageProcessorPil", transformers.CLIPImageProcessor)
    processor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def test_clip_model_gives_clip_similarity_and_a_clip_score(project):
    tiny_clip(project / "clip")
    set_params(project, {"evaluate": {"clip_model": "clip"}})
    try:
        run_stage(project, "evaluate")
        metrics = json.loads((project / "reports" / "eval" / "metrics.json").read_text())
        assert metrics["similarity"] == "clip:clip" and report(project)["computed"] == 0  # images reused, metrics new
        clip = Embedder(project / "clip")
        for name, row in metrics["epochs"].items():
            expected = expected_signs(project, name, clip)
            assert {k: row[k] for k in expected} == pytest.approx(expected, rel=1e-4, abs=1e-6)
        assert "clip:clip" in (project / "reports" / "eval" / "index.html").read_text()
    finally:
        set_params(project, {"evaluate": {"clip_model": None}})
        run_stage(project, "evaluate")


def test_a_missing_clip_folder_is_named(project):
    set_params(project, {"evaluate": {"clip_model": "no-such-clip"}})
    try:
        with pytest.raises(FileNotFoundError, match="evaluate.clip_model.*no-such-clip"):
            run_stage(project, "evaluate")
    finally:
        set_params(project, {"evaluate": {"clip_model": None}})
        run_stage(project, "evaluate")  # the runner emptied the outputs before the stage failed


def test_the_page_holds_the_recommendation_metrics_loss_curve_and_dataset_checks(project):
    page = (project / "reports" / "eval" / "index.html").read_text()
    best = json.loads((project / "reports" / "eval" / "best.json").read_text())
    assert f"Recommendation: {best['epoch']}" in page and best["reasons"][0].split(":")[0] in page
    assert "Train loss per epoch" in page and "<polyline" in page and "Metrics per epoch" in page
    assert "Dataset checks" in page and "<h3>ingest</h3>" in page and "<h3>latents</h3>" in page
    assert 'src="grids/prompt-1.png"' in page and 'src="grids/epoch-0001-captions.png"' in page
    worst = json.loads((project / "reports" / "latents.json").read_text())["vae_check"]["worst"]
    assert worst and "What the VAE loses" in page  # params.yaml turns latents.vae_check on
    assert all(f'src="../{w["sheet"]}"' in page and (project / "reports" / w["sheet"]).is_file() for w in worst)


@pytest.mark.skipif(find_chromium() is None, reason=f"needs Chromium and chromedriver: {INSTALL_HINT}")
def test_the_report_renders_in_headless_chromium_with_every_image(project, tmp_path):
    browser = Browser(*find_chromium())
    try:
        browser.open(project / "reports" / "eval" / "index.html")
        images = browser.images()
        console = browser.console()
        shot = browser.screenshot(tmp_path / "report.png")
    finally:
        browser.close()
    sheets = len(json.loads((project / "reports" / "latents.json").read_text())["vae_check"]["worst"])
    assert (
        sheets and len(images) == 2 + 3 * 2 + sheets
    )  # 2 cross-epoch grids + 3 grids per epoch × 2 epochs + VAE sheets
    assert all(i["ok"] for i in images), [i["src"] for i in images if not i["ok"]]
    assert [c for c in console if c["level"] in ("SEVERE", "WARNING")] == []
    with Image.open(shot) as img:
        assert img.size[0] >= 800 and np.asarray(img.convert("L")).std() > 5  # a real, non-blank page


@pytest.mark.skipif(find_chromium() is None, reason=f"needs Chromium and chromedriver: {INSTALL_HINT}")
def test_the_browser_check_catches_a_broken_image(project, tmp_path):
    page = tmp_path / "index.html"
    shutil.copy(project / "reports" / "eval" / "index.html", page)  # grids/ is not beside the copy
    browser = Browser(*find_chromium())
    try:
        browser.open(page)
        images, console = browser.images(), browser.console()
    finally:
        browser.close()
    assert images and not any(i["ok"] for i in images)
    assert any("ERR_FILE_NOT_FOUND" in c["message"] for c in console)


@pytest.mark.slow
def test_training_one_more_epoch_evaluates_only_the_new_epoch_under_dvc(tmp_path):
    """The real path: `dvc repro`, then `finetune.epochs` 2 → 3 and `dvc repro` again: the
    retrained epochs 1-2 have the same tensors, so only epoch 3's images are generated."""
    import subprocess

    from tests.helpers import env_with_venv

    root = eval_project(tmp_path / "p", git=True, params={"model": {"base": "builtin:tiny-sd15"}})
    env = {**env_with_venv(), "OMP_NUM_THREADS": "1"}
    for epochs in (2, 3):
        set_params(root, {"finetune": {"epochs": epochs}})
        result = subprocess.run(["dvc", "repro"], cwd=root, capture_output=True, text=True, env=env)
        assert result.returncode == 0, result.stdout + result.stderr
    r = report(root)
    assert r["epochs"] == ["epoch-0001", "epoch-0002", "epoch-0003"]
    assert r["epochs_computed"] == ["epoch-0003"] and r["per_epoch_computed"]["epoch-0001"] == 0
    assert r["computed"] == r["per_epoch_computed"]["epoch-0003"] > 0


def test_a_clip_folder_with_only_pickle_weights_needs_the_opt_in(tmp_path):
    """issue 10: the CLIP evaluator loads through the one weights policy, like every model."""
    import torch
    from safetensors.torch import load_file

    from loraforge.errors import InputError

    folder = tiny_clip(tmp_path / "clip")
    weights = folder / "model.safetensors"
    torch.save(load_file(str(weights)), folder / "pytorch_model.bin")  # what old hub repos hold
    weights.unlink()
    with pytest.raises(InputError, match=r"only pickle weights \(pytorch_model.bin\).*`model.allow_pickle: true`"):
        Embedder(folder)
    clip = Embedder(folder, allow_pickle=True)
    assert clip.has_text and clip.texts(["a cat"]).shape == (1, 16)


def test_rule_compares_likeness_only_among_epochs_near_the_lowest_validation_loss():
    rows = series(
        4,
        likeness=[0.2, 0.3, 0.5, 0.6],
        likeness_base=[0.1] * 4,
        validation_loss=[0.100, 0.105, 0.109, 0.130],  # epoch 4 is the most alike, but 30 % over
    )
    best = em.recommend(rows, em.Limits(validation_tolerance=0.1))
    assert best["epoch"] == 3
    assert "not compared on likeness (validation loss over 1.1 × the lowest): epochs 4" in best["reasons"]
    assert em.recommend(rows, em.Limits(validation_tolerance=0.5))["epoch"] == 4  # a looser window
    without = [{k: v for k, v in r.items() if k != "validation_loss"} for r in rows]
    assert em.recommend(without, em.Limits())["epoch"] == 4  # no validation loss: likeness alone
