"""Write CLIP's BPE tokenizer (vocab.json + merges.txt) as transformers' CLIPTokenizer reads it.

Source: `bpe_simple_vocab_16e6.txt.gz`, the merges list OpenAI's CLIP ships (also in the
open-clip-torch wheel, `open_clip/`). CLIP's vocabulary is, in id order: the 256 byte symbols,
the same with the end-of-word mark `</w>`, one token per merge (48 894), then `<|startoftext|>`
and `<|endoftext|>` (49 408 tokens). SD1.5's text encoder and both of SDXL's use it.

    python scripts/make_clip_tokenizer.py PATH/bpe_simple_vocab_16e6.txt.gz loraforge/assets/clip-tokenizer
"""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

N_MERGES = 49152 - 256 - 2  # CLIP's SimpleTokenizer keeps the first 48 894 merges of the file


def byte_symbols() -> list[str]:
    """GPT-2's reversible byte → printable character table, in CLIP's order (printable bytes first)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in keep]
    return [chr(b) for b in keep] + [chr(256 + i) for i in range(len(extra))]


def main(source: Path, out: Path) -> None:
    lines = gzip.open(source, "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : N_MERGES + 1]]
    symbols = byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    out.mkdir(parents=True, exist_ok=True)
    vocab = {t: i for i, t in enumerate(tokens)}
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    text = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
    (out / "merges.txt").write_text(text, encoding="utf-8")
    print(f"{len(vocab)} tokens, {len(merges)} merges → {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
