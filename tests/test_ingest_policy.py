"""issue 10: the source-folder policy (symlinks, hidden files: every entry accounted for once),
duplicate records that always name a kept image, the pixel limit, and expected stops as one line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from loraforge.data.images import read_jsonl
from tests.helpers import run_ingest as ingest
from tests.test_ingest import picture

REPO = Path(__file__).resolve().parents[1]


def every_entry(root: Path) -> set[str]:
    """Every entry under `root` as a user sees it, links not followed: files, hidden entries, and
    symlinks to files or folders (the messy source below has no in-tree folder link to follow)."""
    found = set()
    for folder, dirs, files in os.walk(root):
        rel = Path(folder).relative_to(root)
        hidden = [d for d in dirs if d.startswith(".")]
        links = [d for d in dirs if (Path(folder) / d).is_symlink()]
        found |= {(rel / name).as_posix() for name in [*files, *hidden, *links]}
        dirs[:] = [d for d in dirs if d not in hidden and d not in links]
    return found


def accounted(summary: dict, out: Path) -> dict[str, list[str]]:
    items = [r["source"] for r in read_jsonl(out / "manifest.jsonl")]
    return {
        "items": items,
        "rejects": [r["source"] for r in read_jsonl(out / "rejects.jsonl")],
        "dropped": [r["source"] for r in read_jsonl(out / "dropped.jsonl")]
        + [r["source"] for r in read_jsonl(out / "duplicates.jsonl")],
        "ignored": summary["ignored"],
    }


def messy_source(tmp_path: Path) -> tuple[Path, Path]:
    """A source folder with every kind of entry; returns (source, the folder outside it)."""
    src, outside = tmp_path / "src", tmp_path / "elsewhere"
    for i, name in enumerate(["a.png", "b.png", "5_cats/c.png", "5_cats/d.jpg"]):
        picture(src / name, (64, 48), seed=i)
    (src / "a.txt").write_text("a caption", encoding="utf-8")
    (src / "notes.md").write_text("# notes")
    (src / "orphan.txt").write_text("no image")
    (src / ".DS_Store").write_bytes(b"\0")
    (src / "broken.txt").write_bytes(b"not an image at all")  # a caption-like name with no image
    (src / "junk.png").write_bytes(b"not a png")
    picture(outside / "far.png", (64, 48), seed=9)
    picture(outside / "linked_dir" / "e.png", (64, 48), seed=10)
    (src / "far.png").symlink_to(outside / "far.png")  # a file link leading out
    (src / "7_linkeddir").symlink_to(outside / "linked_dir")  # a folder link leading out
    (src / "alias.png").symlink_to(src / "a.png")  # an in-tree link: followed (an exact duplicate)
    (src / "5_cats" / "loop").symlink_to(src / "5_cats")  # loops back
    (src / "dangling.png").symlink_to(tmp_path / "nowhere.png")
    return src, outside


def test_every_entry_under_the_source_is_accounted_for_exactly_once(tmp_path):
    src, _ = messy_source(tmp_path)
    summary, out = ingest(src, tmp_path / "work", max_reject_ratio=0.9)
    groups = accounted(summary, out)
    rejects = {r["source"]: r["reason"] for r in read_jsonl(out / "rejects.jsonl")}
    assert "outside the source folder" in rejects["far.png"] and "ingest.follow_symlinks" in rejects["far.png"]
    assert "outside the source folder" in rejects["7_linkeddir"]  # the folder is listed, not dropped in silence
    assert "loops back" in rejects["5_cats/loop"] and rejects["dangling.png"].startswith("broken symlink")
    assert set(groups["items"]) == {"a.png", "b.png", "5_cats/c.png", "5_cats/d.jpg"}
    dup = read_jsonl(out / "duplicates.jsonl")
    assert [(d["source"], d["kept"]) for d in dup] == [("alias.png", "a.png")]
    sidecars = {"a.txt"}  # a sidecar caption belongs to its image's item
    listed = groups["items"] + groups["rejects"] + groups["dropped"] + groups["ignored"] + sorted(sidecars)
    assert sorted(listed) == sorted(every_entry(src)), "each entry in exactly one place"
    assert len(listed) == len(set(listed))


def test_follow_symlinks_reads_what_links_point_at_outside(tmp_path):
    src, _ = messy_source(tmp_path)
    summary, out = ingest(src, tmp_path / "work", max_reject_ratio=0.9, follow_symlinks=True)
    items = {r["source"]: r for r in read_jsonl(out / "manifest.jsonl")}
    assert "far.png" in items and "7_linkeddir/e.png" in items
    assert items["7_linkeddir/e.png"]["repeats"] == 7  # the linked folder's kohya name counts
    rejects = {r["source"] for r in read_jsonl(out / "rejects.jsonl")}
    assert {"5_cats/loop", "dangling.png"} <= rejects and "far.png" not in rejects


def test_a_duplicate_of_a_dropped_duplicate_names_the_image_finally_kept(tmp_path):
    """`small.png` is an exact copy of `copy.png`; `copy.png` is a near duplicate of the larger
    `big.png` and dropped for it: `small.png`'s record must name `big.png`, which is kept."""
    src = tmp_path / "src"
    rng = np.random.default_rng(0)
    base = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize((160, 120), Image.NEAREST)
    src.mkdir()
    base.save(src / "big.png")
    small = base.resize((80, 60), Image.LANCZOS)
    small.save(src / "copy.png")
    small.save(src / "small.png")
    picture(src / "other.png", (64, 64), seed=5)
    summary, out = ingest(src, tmp_path / "work")
    kept = {r["source"] for r in read_jsonl(out / "manifest.jsonl")}
    records = {d["source"]: d for d in read_jsonl(out / "duplicates.jsonl")}
    assert kept == {"big.png", "other.png"}
    assert records["copy.png"]["kept"] == "big.png" and records["small.png"]["kept"] == "big.png"
    assert records["small.png"]["distance"] == records["copy.png"]["distance"]  # exact copy: 0 more bits
    assert all(d["kept"] in kept for d in records.values())


def test_an_image_over_max_pixels_is_rejected_before_decoding(tmp_path):
    src = tmp_path / "src"
    picture(src / "big.png", (400, 300), seed=1)
    picture(src / "ok.png", (64, 48), seed=2)
    summary, out = ingest(src, tmp_path / "work", max_reject_ratio=0.9, max_pixels=100_000)
    rejects = {r["source"]: r["reason"] for r in read_jsonl(out / "rejects.jsonl")}
    assert rejects == {"big.png": "400x300 is 0.12 MP, over `ingest.max_pixels` (0.1 MP)"}
    assert [r["source"] for r in read_jsonl(out / "manifest.jsonl")] == ["ok.png"]


def project(tmp_path: Path, source: str) -> Path:
    root = tmp_path / "project"
    root.mkdir()
    for name in ("pipeline.yaml", "params.yaml"):
        (root / name).write_text((REPO / name).read_text())
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["ingest"]["source"] = source
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return root


def stage(root: Path, debug: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "LORAFORGE_DEBUG": "1" if debug else "0"}
    return subprocess.run([sys.executable, "-m", "loraforge", "stage", "ingest"], cwd=root, capture_output=True,
                          text=True, env=env)  # fmt: skip


def test_expected_stops_are_one_line_naming_the_key_and_no_traceback(tmp_path):
    root = project(tmp_path, "photos")
    missing = stage(root)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert missing.stderr.strip().splitlines() == [
        f"loraforge: `ingest.source` folder {root / 'photos'} does not exist"
    ]
    (root / "photos").mkdir()
    for i in range(3):
        (root / "photos" / f"bad{i}.png").write_bytes(b"not a png")
    picture(root / "photos" / "good.png", (64, 48))
    ratio = stage(root)
    assert ratio.returncode == 2 and "Traceback" not in ratio.stderr and len(ratio.stderr.strip().splitlines()) == 1
    assert "3 of 4 files rejected" in ratio.stderr and "`ingest.max_reject_ratio` = 0.2" in ratio.stderr
    debug = stage(root, debug=True)
    assert debug.returncode != 0 and "Traceback" in debug.stderr  # LORAFORGE_DEBUG=1 keeps it
