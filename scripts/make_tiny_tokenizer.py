"""Generate `loraforge/assets/tiny-clip-tokenizer/`: a tiny CLIP BPE tokenizer for the builtin models.

The tokenizer has CLIP's layout and behaviour (byte-level BPE, `</w>` end-of-word suffix,
`<|startoftext|>` / `<|endoftext|>` as the last two ids, 77 positions) with a vocabulary of
~2,000 instead of 49,408, learned here by a small pure-Python BPE trainer over an embedded list of
common caption and prompt words. Common words come out as one or two tokens, so captions and
trigger words behave the way they do with a real model, at a fraction of the embedding size.

The script is deterministic (no randomness, ties broken by the pair's text); its output is
committed. Rerun it only to change the corpus or the size:

    .venv/bin/python scripts/make_tiny_tokenizer.py
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

OUT_DIR = Path(__file__).resolve().parents[1] / "loraforge" / "assets" / "tiny-clip-tokenizer"
VOCAB_SIZE = 2048
MAX_LENGTH = 77  # CLIP's context length: every SD1.5/SDXL text encoder has 77 positions
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
END_OF_WORD = "</w>"

# Words people put in captions and prompts (subjects, styles, colours, shapes, composition, tags).
# Listed once each; earlier groups are weighted higher so their merges come first.
CORPUS_GROUPS = [
    """a an the of and with in on at by for to from is are this that it its his her their
    one two three four five photo photograph picture image painting drawing illustration
    sketch render art artwork style portrait landscape close up closeup shot view background
    foreground detailed high quality best masterpiece realistic photorealistic simple""",
    """red orange yellow green blue purple pink brown black white gray grey gold golden silver
    colorful colourful dark light bright pale pastel vivid monochrome""",
    """circle square triangle rectangle star heart line lines dot dots stripe stripes shape shapes
    round flat sharp soft smooth pattern grid gradient texture solid""",
    """woman man girl boy person people child children lady gentleman face hair eyes smile
    smiling hand hands body standing sitting walking running riding holding wearing looking
    dress shirt jacket hat glasses long short blonde curly""",
    """cat dog horse bird fish flower flowers tree trees forest mountain mountains river lake sea
    ocean beach sky cloud clouds sun moon stars night day sunset sunrise water snow rain grass
    field garden city street road building house room window door car bicycle bike train boat
    castle bridge""",
    """oil watercolor watercolour anime cartoon comic digital pencil ink charcoal
    pixel vector concept fantasy science fiction surreal abstract minimalist vintage retro
    modern classic cinematic lighting shadow shadows lit sharp focus blur blurry bokeh depth
    lens camera wide angle macro film grain noise""",
    """big small large tiny huge little old young new beautiful cute pretty ugly happy sad
    calm quiet busy empty full open closed top bottom left right center centre middle side
    front back above below behind under over near far inside outside""",
    """trigger token class subject concept lora training dataset caption captions tag tags
    sample samples model checkpoint epoch step steps text prompt negative positive""",
    """wooden wood metal glass stone paper fabric leather plastic table chair bed lamp book cup
    bottle kitchen apple fruit food cake bread coffee sword armor knight robot dragon monster
    space planet galaxy neon glow glowing fire smoke fog mist summer winter autumn spring
    morning evening reflection silhouette logo icon character design game poster""",
]


def bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible byte → printable-unicode map (256 entries, in CLIP's vocab order)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, codes)))


def corpus_counts() -> Counter[str]:
    """Word → weight: groups listed earlier weigh more, so their words merge first."""
    counts: Counter[str] = Counter()
    for rank, group in enumerate(CORPUS_GROUPS):
        for word in group.split():
            counts[word.lower()] += len(CORPUS_GROUPS) - rank
    return counts


def word_symbols(word: str, byte_map: dict[int, str]) -> tuple[str, ...]:
    """A word as byte-level symbols, the last one carrying the end-of-word suffix."""
    chars = [byte_map[b] for b in word.encode("utf-8")]
    return (*chars[:-1], chars[-1] + END_OF_WORD)


def merge_word(symbols: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    """Apply one merge to a word, left to right."""
    out: list[str] = []
    i = 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            out.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return tuple(out)


def train_bpe(counts: Counter[str], max_merges: int) -> list[tuple[str, str]]:
    """Greedy BPE: repeatedly merge the most frequent adjacent pair (ties: smallest pair text).

    Args:
        counts: word → weight.
        max_merges: stop after this many merges (or earlier, once every word is one symbol).
    """
    byte_map = bytes_to_unicode()
    words = {word_symbols(w, byte_map): c for w, c in sorted(counts.items())}
    merges: list[tuple[str, str]] = []
    while len(merges) < max_merges:
        pairs: Counter[tuple[str, str]] = Counter()
        for symbols, count in words.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        words = {merge_word(s, best): c for s, c in words.items()}
    return merges


def build_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    """CLIP's vocab layout: 256 bytes, the same with `</w>`, one entry per merge, then BOS, EOS."""
    base = list(bytes_to_unicode().values())
    tokens = [*base, *(b + END_OF_WORD for b in base), *("".join(m) for m in merges), BOS, EOS]
    return {tok: i for i, tok in enumerate(tokens)}


def tokenizer_config() -> dict[str, object]:
    """tokenizer_config.json as a real SD CLIP tokenizer has it (pad = EOS, 77 positions)."""
    return {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MAX_LENGTH,
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": EOS,
        "pad_token": EOS,
        "do_lower_case": True,
        "add_prefix_space": False,
        "errors": "replace",
        "clean_up_tokenization_spaces": False,
    }


def write(out_dir: Path, vocab_size: int) -> None:
    """Train and write vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json.

    Args:
        out_dir: folder to write into (created).
        vocab_size: total vocabulary size including the 512 byte symbols and the 2 special tokens.
    """
    if vocab_size < 514:
        raise ValueError(f"`vocab_size` must be ≥ 514 (bytes, bytes</w>, BOS, EOS), got {vocab_size}")
    merges = train_bpe(corpus_counts(), max_merges=vocab_size - 514)
    vocab = build_vocab(merges)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False) + "\n", encoding="utf-8")
    lines = ["#version: 0.2", *(f"{a} {b}" for a, b in merges)]
    (out_dir / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    config = tokenizer_config()
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    special = {k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out_dir}: {len(vocab)} tokens, {len(merges)} merges")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="output folder")
    parser.add_argument("--vocab-size", type=int, default=VOCAB_SIZE, help="maximum vocabulary size")
    args = parser.parse_args()
    write(args.out, args.vocab_size)


if __name__ == "__main__":
    main()
