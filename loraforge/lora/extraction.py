"""Extraction from weight files: streamed readers, model sources, per-component extraction.

Shared by the `extract` stage and the standalone `loraforge extract` command. A "source" is
either a diffusers folder (`unet/`, `text_encoder/`, `text_encoder_2/` sub-folders, safetensors,
possibly sharded) or one `.safetensors` file holding a diffusers-named UNet state dict (like
loraforge's own `checkpoints/epoch-N/unet.safetensors`). Single-file checkpoints in the original
(ldm) layout (`model.diffusion_model.input_blocks...`, A1111/kohya full checkpoints) are refused
with a message saying so.

Weights are read one tensor at a time with plain reads (not memory maps, see `WeightReader`): at
most one layer of each model is in memory at once.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

import torch

from loraforge.lora import format as L
from loraforge.lora import svd as lora_svd
from loraforge.errors import InputError, MissingInput

Arch = Literal["sd15", "sdxl"]
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


# safetensors dtype names → torch dtypes (the format stores little-endian data).
_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


def read_header(path: Path) -> tuple[dict[str, Any], int]:
    """A safetensors file's header (tensor name → dtype, shape, data_offsets; `__metadata__`) and
    the offset where tensor data starts.

    Args:
        path: the `.safetensors` file.
    """
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        if length <= 0 or length > 100_000_000:
            raise InputError(f"{path}: not a safetensors file (header length {length})")
        header = json.loads(f.read(length))
    return header, 8 + length


class WeightReader:
    """A `get(key) -> Tensor` reader over one or more safetensors files (sharded checkpoints).

    Each call reads exactly one tensor's bytes with a plain positioned read, so only the tensors
    the caller still holds are in memory. (`safetensors.safe_open` memory-maps the file: every
    page it touched stays in the process's resident set until the file is closed, so streaming a
    whole model through it ends with the whole model resident — measured: 2.2× one model's size
    for a base + tuned extraction. Plain reads keep that at one layer.) Use as a context manager.

    Args:
        files: the safetensors files; a key found in two files is an error.
    """

    def __init__(self, files: list[Path]) -> None:
        self.files = [Path(f) for f in files]
        self._index: dict[str, tuple[int, dict[str, Any], int]] = {}  # key → (file no., entry, data start)
        self._handles: list[Any] = []

    def __enter__(self) -> "WeightReader":
        for number, path in enumerate(self.files):
            header, start = read_header(path)
            for key, entry in header.items():
                if key == "__metadata__":
                    continue
                if key in self._index:
                    raise InputError(f"`{key}` is in more than one weight file ({path})")
                self._index[key] = (number, entry, start)
            self._handles.append(open(path, "rb"))
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.close()
        self._handles = []

    @property
    def keys(self) -> list[str]:
        """Every tensor name."""
        return list(self._index)

    def __call__(self, key: str) -> torch.Tensor:
        """Read the tensor `key` (a fresh CPU tensor that owns its memory)."""
        try:
            number, entry, start = self._index[key]
        except KeyError:
            raise KeyError(f"`{key}` is not in {', '.join(str(f) for f in self.files)}") from None
        if entry["dtype"] not in _DTYPES:
            raise InputError(f"`{key}` in {self.files[number]} has unsupported dtype {entry['dtype']}")
        begin, end = entry["data_offsets"]
        buffer = bytearray(end - begin)
        handle = self._handles[number]
        handle.seek(start + begin)
        if handle.readinto(buffer) != len(buffer):
            raise InputError(f"{self.files[number]} is truncated (tensor `{key}`)")
        if not buffer:
            return torch.empty(entry["shape"], dtype=_DTYPES[entry["dtype"]])
        return torch.frombuffer(buffer, dtype=_DTYPES[entry["dtype"]]).reshape(entry["shape"])


MMAP_THRESHOLD = 1 << 20  # bytes: allocations this large get their own mapping, returned on free


def release_large_frees() -> bool:
    """Make glibc return every freed block ≥ 1 MiB to the OS at once (process-wide; idempotent).

    glibc raises its mmap threshold each time a large mapped block is freed (up to 32 MiB), after
    which per-layer buffers come from the heaps of torch's worker threads and stay resident when
    freed: streaming 100 layers of 2 MiB grew the resident set by 1.5× the model (measured) instead
    of one layer. Fixing the threshold (`mallopt(M_MMAP_THRESHOLD)`) turns that off. A no-op
    returning False off glibc.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(-3, MMAP_THRESHOLD))  # -3 = M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


@contextlib.contextmanager
def open_weights(files: list[Path]) -> Iterator[WeightReader]:
    """`WeightReader(files)` as a context manager (see `WeightReader`).

    Args:
        files: safetensors files of one component.
    """
    with WeightReader(files) as reader:
        yield reader


@dataclass(frozen=True)
class ModelSource:
    """Where each component's weights are.

    Attributes:
        path: what the user gave (folder or file).
        files: component → safetensors files; only components present.
        unet_config: the UNet's config.json contents when known (folders), else None.
    """

    path: Path
    files: dict[str, list[Path]]
    unet_config: dict[str, Any] | None = field(default=None, hash=False)


def _folder_weights(folder: Path) -> list[Path]:
    """A component folder's non-variant safetensors: an index's shards, else the single file."""
    indexes = [p for p in folder.glob("*.safetensors.index.json") if p.name.count(".") == 3]
    if indexes:
        weight_map = json.loads(indexes[0].read_text(encoding="utf-8"))["weight_map"]
        return [folder / name for name in sorted(set(weight_map.values()))]
    return sorted(p for p in folder.glob("*.safetensors") if p.name.count(".") == 1 and p.is_file())


def open_source(path: Path, name: str = "source") -> ModelSource:
    """Describe a diffusers folder or a single-file diffusers-named UNet safetensors.

    Args:
        path: the folder or `.safetensors` file.
        name: the argument it came from (`--base`, `--tuned`), for error messages.
    """
    path = Path(path)
    if path.is_file():
        if path.suffix != ".safetensors":
            raise InputError(f"`{name}` {path}: only .safetensors files are read (pickle files can run code)")
        with open_weights([path]) as reader:
            keys = reader.keys
        if any(k.startswith("model.diffusion_model.") for k in keys):
            raise InputError(
                f"`{name}` {path}: an original (ldm) single-file checkpoint; convert it to a diffusers "
                "folder first (diffusers' `from_single_file(...).save_pretrained(...)`)"
            )
        if not any(k.startswith("down_blocks.") for k in keys):
            raise InputError(f"`{name}` {path}: not a diffusers-named UNet state dict (no `down_blocks.*` keys)")
        return ModelSource(path, {"unet": [path]})
    if not path.is_dir():
        raise MissingInput(f"`{name}` {path} does not exist")
    files = {c: w for c in COMPONENTS if (path / c).is_dir() and (w := _folder_weights(path / c))}
    if "unet" not in files and (path / "config.json").is_file() and (w := _folder_weights(path)):
        files = {"unet": w}  # a bare UNet folder
        config_file = path / "config.json"
    else:
        config_file = path / "unet" / "config.json"
    if "unet" not in files:
        raise InputError(
            f"`{name}` {path}: no unet/*.safetensors (a diffusers folder or a UNet .safetensors is expected)"
        )
    config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else None
    return ModelSource(path, files, config)


def detect_arch(keys: list[str], text_encoders: list[str]) -> Arch:
    """`sdxl` when the UNet has SDXL's size/crop embedding or there is a second text encoder, else `sd15`.

    Args:
        keys: the UNet's state-dict keys.
        text_encoders: the text-encoder components present.
    """
    if any(k.startswith("add_embedding.") for k in keys) or "text_encoder_2" in text_encoders:
        return "sdxl"
    return "sd15"


@dataclass(frozen=True)
class ExtractSettings:
    """How to extract (the `extract` params, without the model).

    Attributes:
        dim: rank of Linear and 1×1 conv layers.
        conv_dim: rank of 3×3 convs; 0 leaves them out.
        clamp_quantile: see `loraforge.lora.svd.extract_layer`.
        min_diff: a text encoder whose largest change is not above this is left out.
        save_dtype: dtype of the saved factors.
        svd: `full` or `lowrank`.
    """

    dim: int = 128
    conv_dim: int = 0
    clamp_quantile: float = 1.0
    min_diff: float = 1e-6
    save_dtype: str = "float16"
    svd: lora_svd.SvdMethod = "full"


def extract_component(
    arch: Arch,
    component: str,
    base_files: list[Path],
    tuned_files: list[Path],
    settings: ExtractSettings,
    device: str | torch.device = "cpu",
    unet_config: dict[str, Any] | None = None,
    log: Callable[[str], None] = print,
    on_layer: Callable[[str, dict[str, float]], None] | None = None,
    min_diff_name: str = "extract.min_diff",
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """LoRA tensors for one component, streamed from both checkpoints, and a note of what was decided.

    A text encoder whose largest |tuned − base| is not above `settings.min_diff` is left out and
    a line says so (kohya's `--min_diff`); the note records the decision and the largest change.

    Args:
        arch: `sd15` or `sdxl` (names and prefixes).
        component: `unet`, `text_encoder` or `text_encoder_2`.
        base_files: the base component's safetensors files.
        tuned_files: the tuned component's safetensors files.
        settings: ranks, clamp, min_diff, dtype, SVD method.
        device: where the SVDs run.
        unet_config: the UNet config (SDXL sgm numbering); None derives it from the keys.
        log: where the min_diff decision is written.
        on_layer: per-layer callback (see `loraforge.lora.svd.extract_lora`).
        min_diff_name: how the log names the threshold (`extract.min_diff`, `--min-diff`).
    """
    release_large_frees()  # bounded memory: see its docstring
    with open_weights(base_files) as base, open_weights(tuned_files) as tuned:
        targets = L.lora_targets(arch, component, tuned.keys, conv=settings.conv_dim > 0, unet_config=unet_config)  # type: ignore[arg-type]
        note: dict[str, Any] = {"included": True, "modules": len(targets)}
        if component != "unet":
            diff = lora_svd.max_abs_delta(base, tuned, [f"{m}.weight" for m in targets])
            note["max_diff"] = diff
            if not lora_svd.text_encoder_changed(diff, settings.min_diff):
                log(
                    f"extract: {component} left out: its largest change {diff:.3g} "
                    f"is not above `{min_diff_name}` {settings.min_diff:g}"
                )
                return {}, {**note, "included": False, "modules": 0}
            log(f"extract: {component} included: largest change {diff:.3g} > `{min_diff_name}` {settings.min_diff:g}")
        tensors = lora_svd.extract_lora(
            base,
            tuned,
            targets,
            dim=settings.dim,
            conv_dim=settings.conv_dim,
            clamp_quantile=settings.clamp_quantile,
            dtype=getattr(torch, settings.save_dtype),
            device=device,
            on_layer=on_layer,
            svd=settings.svd,
        )
    return tensors, note


CODE_PATHS = ("stages", "loraforge", "flows", "pipeline.yaml")


def git_revision(folder: Path) -> str:
    """The git commit of `folder`'s repository, with `-dirty` if the pipeline's code (`CODE_PATHS`)
    has uncommitted changes, or `unknown`. Outputs, dvc.lock and .gitignore entries that DVC
    writes do not count: the revision names the code that made a file, and a rerun of the same
    code must write the same bytes.

    Args:
        folder: any folder inside the repository.
    """

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=folder, capture_output=True, text=True, check=True, timeout=30
        ).stdout.strip()

    try:
        head = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no", "--", *CODE_PATHS))
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("-dirty" if dirty else "")


def git_commit_date(folder: Path) -> str | None:
    """ISO 8601 commit date of `folder`'s HEAD, or None outside a git repository. The pipeline
    dates its LoRAs with it so that the same inputs at the same revision give the same bytes
    (a wall-clock date would make every rerun a new file to DVC and to evaluation's caches).

    Args:
        folder: any folder inside the repository.
    """
    try:
        out = subprocess.run(
            ["git", "log", "-1", "--format=%cI"], cwd=folder, capture_output=True, text=True, check=True, timeout=30
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def extraction_metadata(
    arch: Arch,
    title: str,
    settings: ExtractSettings,
    notes: dict[str, dict[str, Any]],
    base_name: str,
    date: str | None = None,
    **training: Any,
) -> dict[str, str]:
    """The header of an extracted LoRA: kohya `ss_*`, `modelspec.*` and loraforge's decisions.

    Args:
        arch: `sd15` or `sdxl`.
        title: `modelspec.title`.
        settings: the extraction settings (dim/alpha, clamp, min_diff, SVD).
        notes: component → note from `extract_component` (min_diff decisions go in the header).
        base_name: what the base model was called (`ss_sd_model_name`).
        date: `modelspec.date` (ISO 8601); None means now.
        training: further `ss_*` entries (epoch, steps, dataset hash, git revision...).
    """
    encoders = {c: n for c, n in notes.items() if c != "unet"}
    comment = (
        f"extracted by loraforge at dim {settings.dim} (conv {settings.conv_dim}), svd {settings.svd}, "
        f"clamp {settings.clamp_quantile}, min_diff {settings.min_diff:g}"
    )
    meta = L.lora_metadata(
        arch,
        dim=settings.dim,
        alpha=float(settings.dim),
        ss_network_args={"conv_dim": settings.conv_dim, "conv_alpha": settings.conv_dim} if settings.conv_dim else {},
        ss_sd_model_name=base_name,
        ss_text_encoders={c: n["included"] for c, n in encoders.items()},
        ss_min_diff={
            c: {"included": n["included"], "max_diff": n.get("max_diff"), "min_diff": settings.min_diff}
            for c, n in encoders.items()
        },
        ss_training_comment=comment,
        **training,
    )
    if not settings.conv_dim:
        meta.pop("ss_network_args")
    return {**meta, **L.modelspec_metadata(arch, title, date=date, description=comment)}
