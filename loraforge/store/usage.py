"""What the item store holds, by kind: `loraforge du`.

An entry's files share its key (`<kind>/<key[:2]>/<key><suffix>`); stage outputs are hard links
to entries, so a file with more than one link is also an output in the workspace (its bytes are
counted once on disk, under the store).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from loraforge.store.items import KINDS, TEMP_PREFIX


@dataclass
class KindUsage:
    """One kind's share of the store.

    Attributes:
        entries: how many entries (distinct keys).
        files: how many files they are made of.
        size: their bytes.
        linked: the bytes of files also linked from the workspace's outputs.
    """

    entries: int = 0
    files: int = 0
    size: int = 0
    linked: int = 0


def store_usage(root: Path) -> dict[str, KindUsage]:
    """Usage per kind folder under the store `root` (kinds with no folder are left out).

    Args:
        root: the store folder (`.loraforge/store`).
    """
    usage: dict[str, KindUsage] = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []:
        kind, keys = KindUsage(), set()
        for path in folder.glob("*/*"):
            if path.name.startswith(TEMP_PREFIX) or not path.is_file():
                continue
            stat = path.stat()
            keys.add(path.name.split(".", 1)[0])
            kind.files += 1
            kind.size += stat.st_size
            kind.linked += stat.st_size if stat.st_nlink > 1 else 0
        kind.entries = len(keys)
        usage[folder.name] = kind
    return usage


def human(size: int) -> str:
    """Bytes as B / KiB / MiB / GiB with three significant figures."""
    value, unit = float(size), "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            break
        value /= 1024
    return f"{value:.0f} {unit}" if unit == "B" else f"{value:.3g} {unit}"


def usage_table(usage: dict[str, KindUsage]) -> str:
    """The `loraforge du` table: one row per kind, biggest first, then the total.

    Args:
        usage: `store_usage`'s result.
    """
    rows = sorted(usage.items(), key=lambda kv: -kv[1].size)
    width = max([len(k) for k in usage] + [5])
    lines = [f"{'kind':<{width}}  {'entries':>8}  {'size':>10}  {'in outputs':>10}  what"]
    for name, u in rows:
        what = KINDS[name].what if name in KINDS else "(a kind this loraforge does not make)"
        lines.append(f"{name:<{width}}  {u.entries:>8}  {human(u.size):>10}  {human(u.linked):>10}  {what}")
    total = KindUsage(*(sum(getattr(u, f) for u in usage.values()) for f in ("entries", "files", "size", "linked")))
    lines.append(f"{'total':<{width}}  {total.entries:>8}  {human(total.size):>10}  {human(total.linked):>10}")
    return "\n".join(lines)
