"""resize: reduce each extracted LoRA to a small rank; the last epoch ships as models/lora.safetensors.

The 001 guide resizes its 512-dim extraction to 16. `resize.method` chooses the rank per layer:
`fixed` (= `resize.rank`), or by singular values (`sv_ratio`, `sv_fro`, `sv_cumulative` with
`resize.param`), capped by `resize.rank`. The dynamic methods take the smallest rank that meets
the target (kohya takes one more); a layer whose own rank is below the target keeps its rank.
Every layer gets alpha = `resize.rank` with its scale folded into `up` (one alpha per file).

LyCORIS and DoRA files (`finetune.network_algo` loha, lokr, dora) are passed through unresized,
with a line and a `passed_through` entry in the report: a LoHa / LoKr update is not a low-rank
product an SVD can truncate layer by layer into the same format, and a DoRA layer's learned
magnitude belongs to its full-rank direction. Set their size with `finetune.network_dim`.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stages.resize_params import Params

if TYPE_CHECKING:
    from loraforge.pipeline.runner import Paths, StageEnv


def pass_through(path: Path, algo: str, folder: Path) -> dict[str, Any]:
    """Copy a LyCORIS / DoRA file unchanged into `folder`; its report entry says why.

    Args:
        path: the `lora-*.safetensors` file.
        algo: its algorithm (`loraforge.lora.lycoris.file_algo`): `loha`, `lokr` or `dora`.
        folder: the stage's `loras` output folder.
    """
    shutil.copyfile(path, folder / path.name)
    reason = f"{algo} file: not SVD-resizable, shipped at its trained size (`resize.*` not applied)"
    print(f"resize: {path.name}: {reason}")
    return {"passed_through": True, "algo": algo, "reason": reason}


def run(params: Params, inputs: "Paths", outputs: "Paths", env: "StageEnv") -> dict[str, Any]:
    """Resize every `lora-*.safetensors` of `inputs.loras`; copy the last to `outputs.final`.

    The report holds, per file, the per-layer table (rank, retained Frobenius %, largest /
    smallest kept singular value) and its summary.
    """
    import torch

    from loraforge.lora.format import load_lora, save_lora
    from loraforge.lora.resize import layer_table, resize_lora, resize_metadata
    from loraforge.lora.lycoris import file_algo

    files = sorted(inputs.loras.glob("lora-*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no lora-*.safetensors in {inputs.loras}")
    per_file: dict[str, Any] = {}
    for path in files:
        tensors, metadata = load_lora(path)
        if file_algo(tensors) != "lora":
            per_file[path.name] = pass_through(path, file_algo(tensors), outputs.loras)
            continue
        resized, stats = resize_lora(tensors, rank=params.rank, method=params.method, param=params.param)
        resized = {
            k: v.to(getattr(torch, params.save_dtype)) if not k.endswith(".alpha") else v for k, v in resized.items()
        }
        save_lora(
            outputs.loras / path.name,
            resized,
            resize_metadata(metadata, params.rank, params.method, params.param, stats, path.stem),
        )
        rows = layer_table(stats)
        fro = [s["fro_retained"] for s in stats.values()]
        per_file[path.name] = {
            "layers": len(stats),
            "mean_fro_retained": sum(fro) / len(fro),
            "min_fro_retained": min(fro),
            "ranks": sorted({s["rank"] for s in stats.values()}),
            "table": rows,
        }
        env.publish.table(f"resize-{path.stem}", rows, f"Per-layer resize of {path.name}")
    shutil.copyfile(outputs.loras / files[-1].name, outputs.final)
    return {
        "items": len(files),
        "computed": len(files),
        "reused": 0,
        "method": params.method,
        "rank": params.rank,
        "files": per_file,
        "final": files[-1].name,
    }
