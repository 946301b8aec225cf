"""A temp project whose pipeline.yaml declares the evaluate stage's full inputs and outputs
(the change issue #6 asks for), for the evaluation and comparison tests. The stage's code deps
are derived from its imports (`loraforge.pipeline.codedeps`), so nothing here lists them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from loraforge.pipeline.dvcgen import sync
from tests.helpers import make_project, run

EVALUATE_INPUTS = {
    "training_images": "data/upscaled",
    "loss": "reports/finetune",
    "ingest_report": "reports/ingest.json",
    "caption_report": "reports/caption.json",
    "latents_report": "reports/latents.json",
}
EVALUATE_OUTPUTS = {
    "metrics": {"path": "reports/eval/metrics.json", "kind": "metrics"},
    "best": "reports/eval/best.json",
    "best_lora": "models/lora-best.safetensors",
    "series": {"path": "reports/eval/epochs.tsv", "kind": "plots"},
    "weight_series": {"path": "reports/eval/weights.tsv", "kind": "plots"},
}
PLOTS = [
    {"reports/eval/epochs.tsv": {"x": "epoch", "y": ["loss", "memorisation", "likeness", "saturation_rise"]}},
    {"reports/eval/weights.tsv": {"x": "weight", "y": "colourfulness"}},
]
# Small evaluation: 1 seed, 64 px, 2 steps, a 3-weight sweep, 1 random prompt, 1 caption.
EVAL_PARAMS: dict[str, Any] = {
    "seeds": [1],
    "steps": 2,
    "size": 64,
    "weights": [0.0, 1.0, 1.2],
    "random_prompts": 1,
    "caption_prompts": 1,
}


def patch_pipeline(project: Path) -> None:
    """Give the project copy's evaluate stage its new inputs/outputs, cache finetune's loss
    curves (so experiments keep them), add the plots, and regenerate dvc.yaml."""
    spec = yaml.safe_load((project / "pipeline.yaml").read_text())
    evaluate = spec["stages"]["evaluate"]
    evaluate["inputs"].update(EVALUATE_INPUTS)
    evaluate["outputs"].update(EVALUATE_OUTPUTS)
    spec["stages"]["finetune"]["outputs"]["loss"] = {"path": "reports/finetune", "kind": "plots"}
    spec["plots"] = [*spec.get("plots", []), *PLOTS]
    (project / "pipeline.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    sync(project)


def eval_project(dest: Path, params: dict[str, dict[str, Any]] | None = None, git: bool = False) -> Path:
    """A project copy (see tests.helpers.make_project) with the patched pipeline; committed when `git`."""
    project = make_project(dest, params={"evaluate": EVAL_PARAMS, **(params or {})}, git=False)
    patch_pipeline(project)
    if git:
        run(["git", "init", "-q"], project)
        run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "add", "-A"], project)
        run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "project"], project)
    return project
