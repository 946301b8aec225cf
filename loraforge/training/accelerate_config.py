"""An accelerate config file (`finetune.accelerate_config`, as `accelerate config` writes it) read
into the launch settings: how many processes on this machine, on how many machines, where they meet.

As in accelerate, `num_processes` counts the processes of all machines together; each machine
runs `num_processes / num_machines` of them. Machine `machine_rank` gives its processes the global
ranks `machine_rank × local … machine_rank × local + local - 1`, and all of them meet at
`main_process_ip:main_process_port` (machine 0 listens there).

`distributed_type: FSDP` shards full finetunes (`loraforge.training.fsdp`; `fsdp_config`:
`fsdp_reshard_after_forward`, FSDP2 only, no parameter offload). DeepSpeed is refused, with the
reason: it needs CUDA and the `deepspeed` package, which this project neither installs nor tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from loraforge.errors import InputError, MissingInput

SUPPORTED_TYPES = ("NO", "MULTI_CPU", "MULTI_GPU", "FSDP")
REFUSED_TYPES = {
    "DEEPSPEED": "DeepSpeed needs CUDA and the `deepspeed` package, which loraforge neither installs nor tests; "
    "use MULTI_GPU (DDP)",
}


@dataclass(frozen=True)
class LaunchConfig:
    """How many processes train on this machine, on how many machines, and where they meet.

    Attributes:
        processes: the process count on this machine.
        port: the rendezvous port (0 = pick a free one; only with one machine).
        gpu_ids: CUDA_VISIBLE_DEVICES for the processes (None = all GPUs).
        machines: the machine count (`num_machines`).
        machine_rank: this machine's index (0 hosts the rendezvous and saves the outputs).
        main_ip: the address of machine 0 (`main_process_ip`).
        fsdp: shard the trained components with FSDP2 (`distributed_type: FSDP`).
        reshard_after_forward: FSDP: free each block's gathered weights after its forward.
    """

    processes: int = 1
    port: int = 0
    gpu_ids: str | None = None
    machines: int = 1
    machine_rank: int = 0
    main_ip: str = "127.0.0.1"
    fsdp: bool = False
    reshard_after_forward: bool = True

    @property
    def world(self) -> int:
        """The process count of all machines together."""
        return self.processes * self.machines

    @property
    def first_rank(self) -> int:
        """The global rank of this machine's first process."""
        return self.machine_rank * self.processes


def launch_config(
    accelerate_config: str | None, num_processes: int, mixed_precision: str, root: Path, machine_rank: int | None = None
) -> LaunchConfig:
    """The launch settings: from `accelerate_config` when set, else `num_processes` on this machine.

    Args:
        accelerate_config: `finetune.accelerate_config`, relative to `root`, or None.
        num_processes: `finetune.num_processes`.
        mixed_precision: `finetune.mixed_precision` (the file must not set another).
        root: the project root.
        machine_rank: `loraforge stage --machine-rank`, or None (the file's `machine_rank`, else 0).
    """
    if accelerate_config:
        return read_accelerate_config(root / accelerate_config, num_processes, mixed_precision, machine_rank)
    if machine_rank:
        raise InputError(
            f"--machine-rank {machine_rank} needs a multi-machine `finetune.accelerate_config` (`num_machines` > 1)"
        )
    return LaunchConfig(processes=num_processes)


def read_accelerate_config(
    path: Path, param_processes: int, mixed_precision: str, machine_rank: int | None = None
) -> LaunchConfig:
    """The launch settings of an accelerate config file (YAML or JSON), checked against params.

    Reads `distributed_type`, `num_processes`, `num_machines`, `machine_rank`, `main_process_ip`,
    `main_process_port` and `gpu_ids`. Refuses FSDP and DeepSpeed (see the module docstring), and
    settings that params.yaml already owns (`mixed_precision`; `num_processes` when
    `finetune.num_processes` says another count).

    Args:
        path: the config file.
        param_processes: `finetune.num_processes`.
        mixed_precision: `finetune.mixed_precision`.
        machine_rank: overrides the file's `machine_rank` (`loraforge stage --machine-rank`), or None.
    """
    where = f"`finetune.accelerate_config` ({path})"
    if not path.is_file():
        raise MissingInput(f"{where}: no such file")
    config = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(config, dict):
        raise InputError(f"{where}: expected a mapping of accelerate settings, got {type(config).__name__}")
    kind = str(config.get("distributed_type", "NO")).upper()
    if kind in REFUSED_TYPES:
        raise InputError(f"{where}: `distributed_type: {kind}` is not supported: {REFUSED_TYPES[kind]}")
    if kind not in SUPPORTED_TYPES:
        raise InputError(
            f"{where}: `distributed_type: {kind}` is not supported; use one of {', '.join(SUPPORTED_TYPES)}"
        )
    precision = str(config.get("mixed_precision", "no"))
    if precision not in ("no", mixed_precision):
        raise InputError(
            f"{where}: `mixed_precision: {precision}` differs from `finetune.mixed_precision: {mixed_precision}`; "
            "set it in params.yaml only"
        )
    processes = integer(config, "num_processes", 1, where)
    if param_processes > 1 and processes != param_processes:
        raise InputError(
            f"{where}: `num_processes: {processes}` differs from `finetune.num_processes: {param_processes}`; set one"
        )
    gpu_ids = str(config.get("gpu_ids", "all")).strip()
    machines = machine_settings(config, processes, machine_rank, where)
    if kind == "FSDP":
        machines.update(fsdp_settings(config, processes, where))
    return LaunchConfig(
        processes=processes // machines["machines"],
        port=integer(config, "main_process_port", 0, where, low=0),
        gpu_ids=None if gpu_ids in ("all", "", "None") else gpu_ids,
        **machines,
    )


def machine_settings(config: dict[str, Any], processes: int, machine_rank: int | None, where: str) -> dict[str, Any]:
    """`machines`, `machine_rank` and `main_ip` of a config, checked: with several machines the
    rank is below their count, the ip and port are set, and the processes divide evenly.

    Args:
        config: the parsed accelerate config.
        processes: its `num_processes` (all machines together).
        machine_rank: the `--machine-rank` override, or None.
        where: the file, for messages.
    """
    machines = integer(config, "num_machines", 1, where)
    rank = integer(config, "machine_rank", 0, where, low=0) if machine_rank is None else machine_rank
    if not 0 <= rank < machines:
        raise InputError(f"{where}: `machine_rank: {rank}` must be from 0 to below `num_machines: {machines}`")
    if rank and machine_rank is None:
        raise InputError(
            f"{where}: `machine_rank: {rank}`: run that machine with `loraforge stage finetune --machine-rank {rank}` "
            "(not `dvc repro`), so that only machine 0 writes the pipeline's outputs"
        )
    if processes % machines:
        raise InputError(
            f"{where}: `num_processes: {processes}` (all machines together) must divide evenly over "
            f"`num_machines: {machines}`"
        )
    ip = str(config.get("main_process_ip") or "").strip()
    if machines > 1:
        for key, value in (("main_process_ip", ip), ("main_process_port", config.get("main_process_port"))):
            if not value:
                raise InputError(f"{where}: `{key}` must be set when `num_machines: {machines}` (machine 0's address)")
    return {"machines": machines, "machine_rank": rank, "main_ip": ip or "127.0.0.1"}


def fsdp_settings(config: dict[str, Any], processes: int, where: str) -> dict[str, Any]:
    """`fsdp` and `reshard_after_forward` of an FSDP config, checked: two processes or more,
    FSDP2 (`fsdp_version: 2`, the default here), no parameter offload.

    Args:
        config: the parsed accelerate config.
        processes: its `num_processes`.
        where: the file, for messages.
    """
    fsdp = config.get("fsdp_config") or {}
    if not isinstance(fsdp, dict):
        raise InputError(f"{where}: `fsdp_config` must be a mapping, got {type(fsdp).__name__}")
    if processes < 2:
        raise InputError(f"{where}: `distributed_type: FSDP` needs `num_processes` of 2 or more, got {processes}")
    if str(fsdp.get("fsdp_version", 2)) != "2":
        raise InputError(
            f"{where}: `fsdp_config.fsdp_version: {fsdp['fsdp_version']}`: loraforge shards with FSDP2 only"
        )
    if str(fsdp.get("fsdp_offload_params", False)).lower() == "true":
        raise InputError(f"{where}: `fsdp_config.fsdp_offload_params: true` is not supported (not tested)")
    reshard = fsdp.get("fsdp_reshard_after_forward", True)
    if str(reshard).lower() not in ("true", "false"):
        raise InputError(f"{where}: `fsdp_config.fsdp_reshard_after_forward: {reshard}` must be true or false")
    return {"fsdp": True, "reshard_after_forward": str(reshard).lower() == "true"}


def integer(config: dict[str, Any], key: str, default: int, where: str, low: int = 1) -> int:
    """`config[key]` as an int of at least `low` (`default` when absent or null).

    Args:
        config: the parsed accelerate config.
        key: the setting.
        default: its value when absent.
        where: the file, for messages.
        low: the least allowed value.
    """
    value = config.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, str)) or not str(value).strip().isdigit():
        raise InputError(f"{where}: `{key}: {value}` must be a whole number")
    if key == "main_process_port" and int(value) > 65535:
        raise InputError(f"{where}: `{key}: {value}` must be a TCP port (1-65535)")
    if int(value) < low:
        raise InputError(f"{where}: `{key}: {value}` must be at least {low}")
    return int(value)
