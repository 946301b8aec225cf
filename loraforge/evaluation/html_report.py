"""Static HTML for the evaluation report and the comparison page: the building blocks, then the
evaluation page itself (`render_page` and its sections).

No JavaScript and no external files: tables, inline SVG line charts and <img> tags whose
`src` is relative to the page, so a report folder can be copied, archived or opened from disk.
"""

from __future__ import annotations

import html
import json
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    from loraforge.evaluation.render import Shots

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")
STYLE = (
    "body{font-family:sans-serif;margin:2em;max-width:1400px}"
    "img{image-rendering:pixelated;max-width:100%}"
    "table{border-collapse:collapse;margin:1em 0}td,th{padding:.2em .8em;border-bottom:1px solid #ddd;text-align:left}"
    ".row{display:flex;gap:1.5em;flex-wrap:wrap;align-items:flex-start}.best{background:#fff3c4}"
    "figure{margin:0}figcaption{font-size:.85em;color:#555}"
)


def esc(value: Any) -> str:
    """HTML-escaped text of `value`.

    Args:
        value: anything with a str().
    """
    return html.escape(str(value))


def fmt(value: Any) -> str:
    """A cell value: 4 significant digits for floats, a dash for None.

    Args:
        value: number, text or None.
    """
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def table(header: Sequence[str], rows: Sequence[Sequence[Any]], highlight: int | None = None) -> str:
    """An HTML table; row `highlight` (index) gets the `best` class.

    Args:
        header: column titles.
        rows: cell values (formatted with `fmt`, escaped).
        highlight: index of the row to highlight, or None.
    """
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join(
        f"<tr{' class=best' if i == highlight else ''}>" + "".join(f"<td>{esc(fmt(c))}</td>" for c in row) + "</tr>"
        for i, row in enumerate(rows)
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def figure(src: str, caption: str) -> str:
    """An <img> with a caption; `src` relative to the page.

    Args:
        src: image path relative to the page.
        caption: text under the image (also the alt text).
    """
    return f'<figure><img src="{esc(src)}" alt="{esc(caption)}"><figcaption>{esc(caption)}</figcaption></figure>'


def _scale(values: list[float], lo_px: float, hi_px: float) -> Any:
    lo, hi = min(values), max(values)
    span = (hi - lo) or 1.0
    return lambda v: lo_px + (v - lo) / span * (hi_px - lo_px)


def line_chart(
    series: dict[str, list[tuple[float, float]]],
    title: str,
    x_label: str,
    y_label: str,
    width: int = 560,
    height: int = 260,
) -> str:
    """An inline SVG chart with one polyline per series and a legend.

    Args:
        series: name → (x, y) points; empty series are left out.
        title: heading above the chart.
        x_label: x axis title.
        y_label: y axis title.
        width: SVG width in pixels.
        height: SVG height in pixels.
    """
    series = {k: v for k, v in series.items() if v}
    if not series:
        return f"<p>{esc(title)}: no data</p>"
    xs = [x for pts in series.values() for x, _ in pts]
    ys = [y for pts in series.values() for _, y in pts]
    sx, sy = _scale(xs, 50, width - 10), _scale(ys, height - 30, 10)
    lines, legend = [], []
    for i, (name, pts) in enumerate(series.items()):
        colour = PALETTE[i % len(PALETTE)]
        coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
        lines.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{coords}"/>')
        legend.append(f'<span style="color:{colour}">■ {esc(name)}</span>')
    axes = (
        f'<text x="50" y="{height - 5}" font-size="11">{esc(x_label)} {min(xs):g} – {max(xs):g}</text>'
        f'<text x="2" y="12" font-size="11">{esc(y_label)} {min(ys):.4g} – {max(ys):.4g}</text>'
        f'<rect x="50" y="10" width="{width - 60}" height="{height - 40}" fill="none" stroke="#999"/>'
    )
    return (
        f'<figure><figcaption>{esc(title)}</figcaption><svg xmlns="http://www.w3.org/2000/svg" width="{width}" '
        f'height="{height}" role="img" aria-label="{esc(title)}">{axes}{"".join(lines)}</svg>'
        f"<div>{' '.join(legend)}</div></figure>"
    )


def page(title: str, body: str) -> str:
    """A complete HTML document.

    Args:
        title: the <title> and <h1>.
        body: inner HTML after the heading.
    """
    return (
        f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
        f"<style>{STYLE}</style></head><body>\n<h1>{esc(title)}</h1>\n{body}\n</body></html>\n"
    )


def read_tsv(text: str) -> list[dict[str, float]]:
    """Rows of a numeric TSV with a header line (finetune's steps.tsv / epochs.tsv).

    Args:
        text: the file's text.
    """
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        return []
    header = lines[0].split("\t")
    return [{k: float(v) for k, v in zip(header, line.split("\t")) if v != ""} for line in lines[1:]]


def write_tsv_text(rows: list[dict[str, Any]]) -> str:
    """TSV text of rows (columns: the union of keys in first-seen order; missing cells empty).

    Args:
        rows: dicts of numbers.
    """
    header: list[str] = []
    for row in rows:
        header += [k for k in row if k not in header]
    out = ["\t".join(header)]
    out += [
        "\t".join(
            "" if row.get(k) is None else (f"{row[k]:.6g}" if isinstance(row[k], float) else str(row[k]))
            for k in header
        )
        for row in rows
    ]
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------- the evaluation page


def render_page(
    epochs: dict[str, Any],
    columns: list[str],
    rows: dict[str, dict[str, Any]],
    cross: list[str],
    best: dict[str, Any],
    checks: dict[str, dict[str, Any]],
    *,
    shots: Shots,
    with_training_images: bool,
    losses: dict[int, float],
    has_text: bool,
) -> str:
    """The evaluation's static report: recommendation, metrics table, loss curve, grids, dataset checks.

    Args:
        epochs: per epoch name: `grids` (page paths), `metrics` (with `per_weight`).
        columns: the metrics table's columns (`epoch`, then the measured keys).
        rows: per epoch name, its metrics.json row.
        cross: the cross-epoch grid paths (one per fixed prompt).
        best: the best.json content.
        checks: earlier stages' reports by stage name.
        shots: what every epoch rendered (prompts, seeds, weights, random prompts, captions).
        with_training_images: whether the caption grids start with the training image.
        losses: train loss per epoch number.
        has_text: whether similarity is CLIP (with a CLIP score) rather than the pixel fallback.
    """
    body = [
        summary_section(epochs, columns, rows, best, losses, has_text),
        fixed_section(list(epochs), cross, shots.prompts, shots.seeds, shots.shown_weight),
        sweep_section(epochs, shots.weights),
        random_section(shots.randoms, epochs),
        caption_section(shots.captions, with_training_images, epochs),
        vae_section(checks.get("latents", {})),
        checks_section(checks),
    ]
    return page("loraforge evaluation", "\n".join(body))


def summary_section(
    epochs: dict[str, Any],
    columns: list[str],
    rows: dict[str, dict[str, Any]],
    best: dict[str, Any],
    losses: dict[int, float],
    has_text: bool,
) -> str:
    """The recommendation with its reasons, the metrics table (best row highlighted) and the
    loss (train, and validation when measured) and colourfulness-vs-weight charts.

    Args:
        epochs: per epoch name, with `metrics.per_weight`.
        columns: the metrics table's columns.
        rows: per epoch name, its metrics.json row.
        best: the best.json content.
        losses: train loss per epoch number.
        has_text: whether similarity is CLIP rather than the pixel fallback.
    """
    cells = [[n, *[row.get(k) for k in columns[1:]]] for n, row in rows.items()]
    validation = [(r["epoch"], r["validation_loss"]) for r in rows.values() if r.get("validation_loss") is not None]
    curves = {"train loss": sorted(losses.items()), "validation loss": validation}
    title = "Train and validation loss per epoch" if validation else "Train loss per epoch"
    loss = line_chart(curves, title, "epoch", "loss")
    sat = line_chart(
        {n: [(float(w), s["colourfulness"]) for w, s in e["metrics"]["per_weight"].items()] for n, e in epochs.items()},
        "Colourfulness vs LoRA weight",
        "weight",
        "colourfulness",
    )
    reasons = "".join(f"<li>{esc(r)}</li>" for r in best["reasons"])
    parts = [
        f"<h2>Recommendation: {esc(best['epoch'])}</h2><ul>{reasons}</ul>",
        f"<p>Similarity measured with <code>{esc(best['similarity'])}</code>"
        + ("" if has_text else " (no CLIP model: pixel-thumbnail fallback, no CLIP score)")
        + ". "
        f"Best LoRA: <code>{esc(best['lora'])}</code>.</p>",
        "<h2>Metrics per epoch</h2>" + table(columns, cells, highlight=list(epochs).index(best["epoch"])),
        f'<div class="row">{loss}{sat}</div>',
    ]
    return "\n".join(parts)


def fixed_section(
    names: list[str], cross: list[str], prompts: list[str], seeds: Sequence[int], shown_weight: float
) -> str:
    """The fixed-seed grids across epochs, one per prompt (rows: epochs, columns: seeds).

    Args:
        names: the epoch names, in row order.
        cross: the cross-epoch grid paths (one per fixed prompt).
        prompts: the rendered fixed prompts.
        seeds: the fixed seeds.
        shown_weight: the LoRA weight of these grids.
    """
    return (
        f"<h2>Fixed seeds across epochs (weight {shown_weight:g})</h2><p>Rows: {esc(', '.join(names))}; "
        f"columns: seeds {esc(', '.join(map(str, seeds)))}.</p>"
        + '<div class="row">'
        + "".join(figure(src, f"prompt {i + 1}: {prompts[i]}") for i, src in enumerate(cross))
        + "</div>"
    )


def sweep_section(epochs: dict[str, Any], weights: Sequence[float]) -> str:
    """Each epoch's weight-sweep grid (columns: weights, rows: prompt × seed).

    Args:
        epochs: per epoch name, with `grids`.
        weights: the weight sweep.
    """
    return (
        f"<h2>Weight sweep per epoch</h2><p>Columns: LoRA weight {esc(', '.join(f'{w:g}' for w in weights))} "
        f"(0 = base model); rows: each prompt × seed.</p>"
        + '<div class="row">'
        + "".join(figure(e["grids"]["sweep"], n) for n, e in epochs.items())
        + "</div>"
    )


def random_section(randoms: list[tuple[str, int]], epochs: dict[str, Any]) -> str:
    """The random-prompt grids with their recorded prompts and seeds.

    Args:
        randoms: the random prompts with their seeds.
        epochs: per epoch name, with `grids`.
    """
    if not randoms:
        return ""
    legend = "".join(f"<li>{esc(prompt)} — seed {seed}</li>" for prompt, seed in randoms)
    figs = "".join(figure(e["grids"]["random"], n) for n, e in epochs.items())
    return f'<h2>Random prompts (columns: weight 0, 1)</h2><ol>{legend}</ol><div class="row">{figs}</div>'


def caption_section(captions: list[dict[str, Any]], with_training_images: bool, epochs: dict[str, Any]) -> str:
    """The training captions prompted 1:1 beside their training image (memorisation).

    Args:
        captions: the training captions prompted 1:1 (`id`, `caption`).
        with_training_images: whether the grids start with the training image.
        epochs: per epoch name, with `grids`.
    """
    if not captions:
        return ""
    legend = "".join(f"<li>{esc(c['caption'])}</li>" for c in captions)
    figs = "".join(figure(e["grids"]["captions"], n) for n, e in epochs.items())
    first = "training image, " if with_training_images else ""
    return (
        f"<h2>Training captions prompted 1:1 (columns: {first}weight 0, weight 1)</h2>"
        f"<p>Near-copies of the training image mean overtraining (001 guide).</p><ol>{legend}</ol>"
        f'<div class="row">{figs}</div>'
    )


def vae_section(latents_report: dict[str, Any]) -> str:
    """What the VAE loses (003 guide): the worst reconstructions, original | reconstruction |
    error, with their PSNR. Empty when `latents.vae_check` is off.

    Args:
        latents_report: `reports/latents.json` (its `vae_check` section; sheets live in reports/vae_check).
    """
    check = latents_report.get("vae_check") or {}
    if not check.get("worst"):
        return ""
    figs = "".join(
        figure(
            f"../{w['sheet']}", f"{w['source']}: {w['psnr_db']:g} dB (worst window {w['worst_window_psnr_db']:g} dB)"
        )
        for w in check["worst"]
    )
    return (
        f"<h2>What the VAE loses</h2><p>decode(encode(image)) with the training VAE: mean PSNR "
        f"{esc(check['mean_psnr_db'])} dB over {esc(check['images'])} images. Worst windows, enlarged: original | "
        f"reconstruction | error ×4. Details lost here cannot be learned (003 guide).</p>"
        f'<div class="row">{figs}</div>'
    )


def checks_section(checks: dict[str, dict[str, Any]]) -> str:
    """The dataset checks from earlier stages: each report's scalar facts and any rejects.

    Args:
        checks: earlier stages' reports by stage name.
    """
    if not checks:
        return ""
    parts = ["<h2>Dataset checks</h2>"]
    for stage, report in checks.items():
        facts = [
            [k, v]
            for k, v in report.items()
            if isinstance(v, (int, float, str, bool)) and k not in ("stage", "seconds")
        ]
        parts.append(f"<h3>{esc(stage)}</h3>" + table(["fact", "value"], facts))
        for key in ("rejected", "duplicates_dropped", "over_limit", "warnings"):
            if report.get(key):
                parts.append(
                    f"<p>{esc(key)}:</p><pre>{esc(json.dumps(report[key], indent=1, ensure_ascii=False))}</pre>"
                )
    return "\n".join(parts)
