"""Static HTML building blocks for the evaluation report and the comparison page.

No JavaScript and no external files: tables, inline SVG line charts and <img> tags whose
`src` is relative to the page, so a report folder can be copied, archived or opened from disk.
"""

from __future__ import annotations

import html
from typing import Any, Sequence

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
