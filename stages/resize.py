"""resize: reduce each extracted LoRA to a small rank; the last epoch ships as models/lora.safetensors.

The 001 guide resizes its 512-dim extraction to 16. `resize.method` chooses the rank per layer:
`fixed` (= `resize.rank`), or by singular values (`sv_ratio`, `sv_fro`, `sv_cumulative` with
`resize.param`), capped by `resize.rank`. The dynamic methods take the smallest rank that meets
the target (kohya takes one more); a layer whose own rank is below the target keeps its rank.
Every layer gets alpha = `resize.rank` with its scale folded into `up` (one alpha per file).
"""

from __future__ import annotations

import shutil
from typing import TYPE_CHECKING, Any

from stages.resize_params import Params

if TYPE_CHECKING:
    from loraforge.runner import Paths, StageEnv


def run(params: Params, inputs: "Paths", outputs: "Paths", env: "StageEnv") -> dict[str, Any]:
    """Resize every `lora-*.safetensors` of `inputs.loras`; copy the last to `outputs.final`.

    The report holds, per file, the per-layer table (rank, retained Frobenius %, largest /
    smallest kept singular value) and its summary.
    """
    import torch

    from loraforge.lora import load_lora, save_lora
    from loraforge.lora_resize import layer_table, resize_lora, resize_metadata

    files = sorted(inputs.loras.glob("lora-*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no lora-*.safetensors in {inputs.loras}")
    per_file = {}
    for path in files:
        tensors, metadata = load_lora(path)
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
