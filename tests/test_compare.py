"""`loraforge compare` (issue #6): the side-by-side page from plain run folders, and for real
from a two-experiment `dvc exp run --queue` sweep in a temp git repo."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from loraforge.evaluation import compare
from loraforge.pipeline.runner import run_stage
from tests.browser import INSTALL_HINT, Browser, find_chromium
from tests.evalproject import eval_project
from tests.helpers import env_with_venv, run, set_params

SD15 = {"model": {"base": "builtin:tiny-sd15"}, "finetune": {"epochs": 2, "save_every_n_epochs": 1}}
STAGES = ["ingest", "upscale", "caption", "latents", "finetune", "extract", "resize", "evaluate"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two plain run folders: the same project trained at two learning rates."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    folders = []
    for lr in (0.0001, 0.001):
        root = eval_project(tmp_path_factory.mktemp("runs") / f"lr-{lr}", params=SD15)
        set_params(root, {"finetune": {"lr": lr}})
        for stage in STAGES:
            run_stage(root, stage)
        folders.append(root)
    yield folders
    torch.set_num_threads(threads)


def parse(argv: list[str]) -> argparse.Namespace:
    """argv through a parser holding only the compare subcommand (as the CLI will wire it)."""
    parser = argparse.ArgumentParser(prog="loraforge")
    compare.add_compare_command(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_flatten_and_differing_params():
    a, b = (
        compare.flatten({"finetune": {"lr": 1e-4, "epochs": 2}, "x": [1]}),
        compare.flatten({"finetune": {"lr": 1e-3, "epochs": 2}, "x": [1]}),
    )
    assert a == {"finetune.lr": 1e-4, "finetune.epochs": 2, "x": [1]}
    assert compare.differing([a, b]) == ["finetune.lr"]


def test_compare_of_run_folders_puts_grids_curves_and_metrics_side_by_side(runs, tmp_path):
    out = tmp_path / "cmp"
    args = parse(["compare", str(runs[0]), str(runs[1]), "--out", str(out), "--root", str(runs[0])])
    assert args.func(args) == 0
    page = (out / "index.html").read_text()
    for j, root in enumerate(runs):
        for i in (1, 2):
            copied = out / f"{j}-{compare.slug(str(root))}" / f"prompt-{i}.png"
            assert copied.read_bytes() == (root / "reports" / "eval" / "grids" / f"prompt-{i}.png").read_bytes()
            assert f'src="{copied.relative_to(out).as_posix()}"' in page
    assert "<th>finetune.lr</th>" in page and "<td>0.0001</td>" in page and "<td>0.001</td>" in page
    assert page.count("<polyline") == 3 * 2  # loss per epoch, loss per step, LR per step × 2 runs
    header, rows = compare.metric_rows([compare.load_run(r, r.name) for r in runs])
    assert header == ["metric", runs[0].name, runs[1].name]
    loss = next(r for r in rows if r[0] == "epochs.epoch-0002.loss")
    assert loss[1] != loss[2]  # two learning rates, two loss values side by side


def test_compare_names_what_it_cannot_find(runs, tmp_path, capsys):
    args = parse(["compare", "no-such-exp", "--out", str(tmp_path / "c"), "--root", str(runs[0])])
    assert args.func(args) == 2
    assert "`no-such-exp` is not a folder, and" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="metrics.json"):
        compare.load_run(tmp_path, "empty")


@pytest.mark.skipif(find_chromium() is None, reason=f"needs Chromium and chromedriver: {INSTALL_HINT}")
def test_the_comparison_renders_in_headless_chromium(runs, tmp_path):
    page = compare.compare([str(r) for r in runs], runs[0], tmp_path / "cmp")
    browser = Browser(*find_chromium())
    try:
        browser.open(page)
        images, console = browser.images(), browser.console()
        browser.screenshot(tmp_path / "compare.png")
    finally:
        browser.close()
    assert len(images) == 4 and all(i["ok"] for i in images)
    assert [c for c in console if c["level"] in ("SEVERE", "WARNING")] == []
    assert (tmp_path / "compare.png").stat().st_size > 1000


@pytest.mark.slow
def test_a_queued_dvc_sweep_and_compare(tmp_path):
    """`dvc exp run --queue -S finetune.lr=…` twice, `--run-all`, then compare the experiments by name."""
    root = eval_project(tmp_path / "p", params=SD15, git=True)
    env = {**env_with_venv(), "OMP_NUM_THREADS": "1"}

    def dvc(*args: str) -> str:
        result = subprocess.run(["dvc", *args], cwd=root, capture_output=True, text=True, env=env)
        assert result.returncode == 0, f"dvc {' '.join(args)}:\n{result.stdout}\n{result.stderr}"
        return result.stdout

    for name, lr in (("lr-low", "0.0001"), ("lr-high", "0.001")):
        dvc("exp", "run", "--queue", "-S", f"finetune.lr={lr}", "-n", name)
    dvc("exp", "run", "--run-all")
    assert set(compare.experiment_refs(root)) == {"lr-low", "lr-high"}
    shown = dvc("exp", "show", "--json")
    assert json.loads(shown) and '"lr-low"' in shown and '"lr-high"' in shown
    diff = dvc("metrics", "diff", "lr-low", "lr-high", "--md")
    assert "reports/eval/metrics.json" in diff and "best.loss" in diff
    dvc("plots", "diff", "lr-low", "lr-high", "-o", str(tmp_path / "plots"))
    assert (tmp_path / "plots" / "index.html").is_file()

    args = parse(["compare", "lr-low", "lr-high", "--root", str(root)])
    cwd = os.getcwd()
    assert args.func(args) == 0
    assert os.getcwd() == cwd
    page = (root / "reports" / "compare" / "index.html").read_text()
    assert (root / "reports" / "compare" / "0-lr-low" / "prompt-1.png").is_file()
    assert (root / "reports" / "compare" / "1-lr-high" / "prompt-2.png").is_file()
    assert "<td>0.0001</td>" in page and "<td>0.001</td>" in page and page.count("<polyline") == 6
    assert (
        run(["git", "status", "--porcelain", "--untracked-files=no"], root).stdout.strip() == ""
    )  # workspace untouched
