"""`loraforge compare EXP...`: one page comparing experiments the 004 guide's way.

Per experiment: the same fixed-seed grids (rows = epochs, columns = seeds, one grid per fixed
prompt), side by side; train loss (per epoch and per step) and learning rate overlaid; the
metrics table and the recommendation side by side; and the params that differ.

An EXP is a run folder (a project folder holding `reports/eval/metrics.json`) or, inside a DVC
project, a DVC experiment name (`dvc exp show`) or any git revision: its reports are read from
that revision through DVC (git for small files, the DVC cache for outputs).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from loraforge.errors import InputError, MissingInput
from loraforge.evaluation.html_report import esc, figure, line_chart, page, read_tsv, table

NEEDED = ("reports/eval", "reports/finetune", "params.yaml")


@dataclass
class Run:
    """One experiment's results, read from a folder.

    Attributes:
        label: the name shown on the page.
        folder: the folder holding `reports/` (and `params.yaml`).
        metrics: reports/eval/metrics.json.
        best: reports/eval/best.json (empty when absent).
        params: params.yaml (empty when absent).
        steps: rows of reports/finetune/steps.tsv.
        epochs: rows of reports/finetune/epochs.tsv.
        grids: the cross-epoch fixed-seed grids (`reports/eval/grids/prompt-N.png`), in order.
    """

    label: str
    folder: Path
    metrics: dict[str, Any]
    best: dict[str, Any] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    steps: list[dict[str, float]] = field(default_factory=list)
    epochs: list[dict[str, float]] = field(default_factory=list)
    grids: list[Path] = field(default_factory=list)


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _read_rows(path: Path) -> list[dict[str, float]]:
    return read_tsv(path.read_text(encoding="utf-8")) if path.is_file() else []


def _prompt_number(path: Path) -> int:
    return int(path.stem.split("-")[-1])


def load_run(folder: Path, label: str) -> Run:
    """Read one run folder.

    Args:
        folder: a folder holding `reports/eval/metrics.json`.
        label: the name to show.

    Raises:
        FileNotFoundError: the folder has no evaluation metrics (names the file).
    """
    folder = Path(folder)
    metrics_file = folder / "reports" / "eval" / "metrics.json"
    if not metrics_file.is_file():
        raise MissingInput(f"`{label}`: no {metrics_file} (run the evaluate stage first)")
    params_file = folder / "params.yaml"
    return Run(
        label=label,
        folder=folder,
        metrics=_read_json(metrics_file),
        best=_read_json(folder / "reports" / "eval" / "best.json"),
        params=yaml.safe_load(params_file.read_text()) or {} if params_file.is_file() else {},
        steps=_read_rows(folder / "reports" / "finetune" / "steps.tsv"),
        epochs=_read_rows(folder / "reports" / "finetune" / "epochs.tsv"),
        grids=sorted((folder / "reports" / "eval" / "grids").glob("prompt-*.png"), key=_prompt_number),
    )


# ---------------------------------------------------------------- DVC experiments


def git(root: Path, *args: str) -> str:
    """Output of a git command in `root` (stripped); raises with git's message on failure.

    Args:
        root: the repository.
        args: git arguments.
    """
    result = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
    if result.returncode != 0:
        raise ValueError(f"git {' '.join(args)} failed in {root}: {result.stderr.strip()}")
    return result.stdout.strip()


def experiment_refs(root: Path) -> dict[str, str]:
    """DVC experiment names → commit, from the `refs/exps/...` refs `dvc exp run` writes.

    Args:
        root: the DVC project (a git repository).
    """
    out = git(root, "for-each-ref", "--format=%(refname) %(objectname)", "refs/exps")
    refs = {}
    for line in out.splitlines():
        ref, sha = line.split()
        if ref.count("/") >= 4:  # refs/exps/ab/cdef.../name (skip refs/exps/exec/... and stash refs)
            refs[ref.rsplit("/", 1)[1]] = sha
    return refs


def resolve_rev(root: Path, name: str) -> str:
    """The commit of a DVC experiment name, else of a git revision.

    Args:
        root: the DVC project.
        name: experiment name, branch, tag or commit.

    Raises:
        ValueError: neither an experiment nor a revision (lists the experiments).
    """
    try:
        refs = experiment_refs(root)
    except ValueError:
        raise InputError(
            f"`{name}` is not a folder, and {root} is not a git repository (DVC experiments need one)"
        ) from None
    if name in refs:
        return refs[name]
    try:
        return git(root, "rev-parse", "--verify", "--quiet", f"{name}^{{commit}}")
    except ValueError:
        known = ", ".join(sorted(refs)) or "none"
        raise InputError(
            f"`{name}` is not a folder, a DVC experiment (known: {known}) or a git revision in {root}"
        ) from None


def fetch_revision(root: Path, rev: str, dest: Path) -> Path:
    """Copy the reports and params.yaml of revision `rev` into `dest`, through DVC (git-tracked
    files from the commit, DVC outputs from the cache).

    Args:
        root: the DVC project.
        rev: a commit.
        dest: an empty folder.
    """
    from dvc.api import DVCFileSystem

    fs = DVCFileSystem(str(root), rev=rev)
    for path in NEEDED:
        if not fs.exists(path):
            continue
        target = dest / path
        target.parent.mkdir(parents=True, exist_ok=True)
        if fs.isdir(path):
            fs.get(path, str(target), recursive=True)
        else:
            fs.get_file(path, str(target))
    return dest


def gather(specs: list[str], root: Path, work: Path) -> list[Run]:
    """Runs for the command-line EXPs: folders as they are, others fetched from DVC/git into `work`.

    Args:
        specs: run folders or experiment names / revisions.
        root: the DVC project (for names).
        work: scratch folder for fetched revisions.
    """
    runs = []
    for i, spec in enumerate(specs):
        folder = Path(spec)
        if not folder.is_dir():
            folder = fetch_revision(root, resolve_rev(root, spec), work / f"{i}-{slug(spec)}")
        runs.append(load_run(folder, spec))
    return runs


# ---------------------------------------------------------------- the page


def slug(text: str) -> str:
    """A file-name-safe version of `text`.

    Args:
        text: any label.
    """
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "run"


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings as `a.b.c` keys (lists kept as values).

    Args:
        obj: a mapping (or a leaf).
        prefix: key prefix so far.
    """
    if not isinstance(obj, dict):
        return {prefix: obj}
    out: dict[str, Any] = {}
    for k, v in obj.items():
        out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def differing(dicts: list[dict[str, Any]]) -> list[str]:
    """Flattened keys whose values are not the same in every mapping.

    Args:
        dicts: flattened mappings, one per run.
    """
    keys = sorted({k for d in dicts for k in d})
    return [k for k in keys if len({json.dumps(d.get(k), sort_keys=True) for d in dicts}) > 1]


def metric_rows(runs: list[Run]) -> tuple[list[str], list[list[Any]]]:
    """The side-by-side metrics table: one row per metric, one column per run.

    Args:
        runs: the runs.
    """
    flat = [
        flatten(
            {
                "best_epoch": r.metrics.get("best_epoch"),
                "best": r.metrics.get("best", {}),
                "epochs": r.metrics.get("epochs", {}),
            }
        )
        for r in runs
    ]
    keys = [k for k in dict.fromkeys(k for f in flat for k in f)]
    return ["metric", *[r.label for r in runs]], [[k, *[f.get(k) for f in flat]] for k in keys]


def curves(runs: list[Run], rows: str, column: str) -> dict[str, list[tuple[float, float]]]:
    """Per run, (x, y) points of a finetune TSV column (`steps`: x = step, `epochs`: x = epoch).

    Args:
        runs: the runs.
        rows: `steps` or `epochs`.
        column: the y column (`loss`, `lr`).
    """
    x = "step" if rows == "steps" else "epoch"
    return {r.label: [(row[x], row[column]) for row in getattr(r, rows) if column in row] for r in runs}


def render(runs: list[Run], out: Path) -> str:
    """The comparison page; copies each run's grids under `out/<slug>/`.

    Args:
        runs: the runs, in the order given.
        out: the folder the page is written to.
    """
    params = [flatten(r.params) for r in runs]
    diff = differing(params)
    overview = table(
        ["experiment", *diff, "recommended", "similarity"],
        [
            [r.label, *[p.get(k) for k in diff], r.best.get("epoch"), r.metrics.get("similarity")]
            for r, p in zip(runs, params)
        ],
    )
    grids = []
    for i in range(max((len(r.grids) for r in runs), default=0)):
        figs = []
        for j, r in enumerate(runs):
            if i < len(r.grids):
                target = out / f"{j}-{slug(r.label)}" / r.grids[i].name
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(r.grids[i], target)
                figs.append(figure(target.relative_to(out).as_posix(), r.label))
        grids.append(f'<h3>Prompt {i + 1}</h3><div class="row">{"".join(figs)}</div>')
    charts = "".join(
        [
            line_chart(curves(runs, "epochs", "loss"), "Train loss per epoch", "epoch", "loss"),
            line_chart(curves(runs, "steps", "loss"), "Train loss per step", "step", "loss"),
            line_chart(curves(runs, "steps", "lr"), "Learning rate per step", "step", "lr"),
        ]
    )
    reasons = "".join(
        f"<h3>{esc(r.label)}: {esc(r.best.get('epoch', '—'))}</h3><ul>"
        + "".join(f"<li>{esc(x)}</li>" for x in r.best.get("reasons", []))
        + "</ul>"
        for r in runs
    )
    header, rows = metric_rows(runs)
    body = (
        f"<h2>Experiments</h2>{overview}<h2>Fixed-seed grids (rows: epochs, columns: seeds)</h2>{''.join(grids)}"
        f'<h2>Curves</h2><div class="row">{charts}</div><h2>Recommendations</h2>{reasons}'
        f"<h2>Metrics side by side</h2>{table(header, rows)}"
    )
    return page("loraforge comparison: " + ", ".join(r.label for r in runs), body)


def compare(specs: list[str], root: Path, out: Path) -> Path:
    """Build the comparison page for `specs` at `out/index.html`; return its path.

    Args:
        specs: run folders or DVC experiment names / git revisions (at least one).
        root: the DVC project, for names.
        out: output folder (emptied first).
    """
    import tempfile

    if not specs:
        raise InputError("`compare` needs at least one experiment or run folder")
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    with tempfile.TemporaryDirectory(prefix="loraforge-compare-") as work:
        runs = gather(specs, Path(root), Path(work))
        (out / "index.html").write_text(render(runs, out), encoding="utf-8")
    return out / "index.html"


def cmd_compare(args: argparse.Namespace) -> int:
    """`loraforge compare`: write the page and print where it is.

    Args:
        args: parsed arguments (`experiments`, `out`, `root`).
    """
    from loraforge.pipeline.spec import find_root

    root = Path(args.root) if args.root else find_root()
    try:
        page_path = compare(args.experiments, root, Path(args.out) if args.out else root / "reports" / "compare")
    except (ValueError, FileNotFoundError) as e:
        print(f"loraforge compare: {e}", file=sys.stderr)
        return 2
    print(f"wrote {page_path}")
    return 0


def add_compare_command(subparsers: Any) -> None:
    """Register `loraforge compare EXP... [--out DIR] [--root DIR]`.

    Args:
        subparsers: the CLI's `add_subparsers()` object.
    """
    p = subparsers.add_parser(
        "compare", help="one page comparing experiments: fixed-seed grids, curves, metrics side by side"
    )
    p.add_argument("experiments", nargs="+", metavar="EXP", help="DVC experiment name, git revision, or run folder")
    p.add_argument("--out", help="output folder (default: reports/compare)")
    p.add_argument("--root", help="the DVC project (default: the folder holding pipeline.yaml)")
    p.set_defaults(func=cmd_compare)
