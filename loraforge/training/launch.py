"""Data-parallel launch: N local processes through accelerate, set by `finetune.num_processes` or
by an accelerate config file (`finetune.accelerate_config`, as `accelerate config` writes it).

`launch` spawns the processes (torch.multiprocessing); each sets RANK/WORLD_SIZE/MASTER_* and runs
the stage's `train`, where accelerate builds the process group (gloo on CPU, NCCL on GPUs). The
first process draws the terminal bar and sends its tables and progress through a queue to the
parent, which hands them to the publisher (a Prefect publisher may not pickle). A process's error
is raised in the parent with its own type and message; torch stops the other processes at once.
"""

from __future__ import annotations

import dataclasses
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch.multiprocessing as mp
import yaml

from loraforge.runner import Paths, StageEnv

SUPPORTED_TYPES = ("NO", "MULTI_CPU", "MULTI_GPU")


@dataclass(frozen=True)
class LaunchConfig:
    """How many local processes train, and where they meet.

    Attributes:
        processes: the process count.
        port: the rendezvous port on 127.0.0.1 (0 = pick a free one).
        gpu_ids: CUDA_VISIBLE_DEVICES for the processes (None = all GPUs).
    """

    processes: int = 1
    port: int = 0
    gpu_ids: str | None = None


def launch_config(accelerate_config: str | None, num_processes: int, mixed_precision: str, root: Path) -> LaunchConfig:
    """The process count (and port, GPUs): from `accelerate_config` when set, else `num_processes`.

    Args:
        accelerate_config: `finetune.accelerate_config`, relative to `root`, or None.
        num_processes: `finetune.num_processes`.
        mixed_precision: `finetune.mixed_precision` (the file must not set another).
        root: the project root.
    """
    if accelerate_config:
        return read_accelerate_config(root / accelerate_config, num_processes, mixed_precision)
    return LaunchConfig(processes=num_processes)


def read_accelerate_config(path: Path, param_processes: int, mixed_precision: str) -> LaunchConfig:
    """The launch settings of an accelerate config file (YAML or JSON), checked against params.

    Reads `num_processes`, `gpu_ids` and `main_process_port`. FSDP, DeepSpeed and multi-machine
    setups are refused (not supported yet), as are settings that params.yaml already owns
    (`mixed_precision`, and `num_processes` when `finetune.num_processes` is also set).

    Args:
        path: the config file.
        param_processes: `finetune.num_processes`.
        mixed_precision: `finetune.mixed_precision`.
    """
    where = f"`finetune.accelerate_config` ({path})"
    if not path.is_file():
        raise FileNotFoundError(f"{where}: no such file")
    config = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(config, dict):
        raise ValueError(f"{where}: expected a mapping of accelerate settings, got {type(config).__name__}")
    kind = str(config.get("distributed_type", "NO")).upper()
    if kind not in SUPPORTED_TYPES:
        raise ValueError(
            f"{where}: `distributed_type: {kind}` is not supported; loraforge runs {', '.join(SUPPORTED_TYPES)} "
            "(data-parallel on one machine)"
        )
    if int(config.get("num_machines", 1)) != 1:
        raise ValueError(f"{where}: `num_machines: {config['num_machines']}`: multi-machine training is not supported")
    precision = str(config.get("mixed_precision", "no"))
    if precision not in ("no", mixed_precision):
        raise ValueError(
            f"{where}: `mixed_precision: {precision}` differs from `finetune.mixed_precision: {mixed_precision}`; "
            "set it in params.yaml only"
        )
    processes = int(config.get("num_processes", 1))
    if processes < 1:
        raise ValueError(f"{where}: `num_processes: {processes}` must be at least 1")
    if param_processes > 1 and processes != param_processes:
        raise ValueError(
            f"{where}: `num_processes: {processes}` differs from `finetune.num_processes: {param_processes}`; set one"
        )
    gpu_ids = str(config.get("gpu_ids", "all")).strip()
    return LaunchConfig(
        processes=processes,
        port=int(config.get("main_process_port") or 0),
        gpu_ids=None if gpu_ids in ("all", "", "None") else gpu_ids,
    )


def free_port() -> int:
    """A free TCP port on 127.0.0.1 for the process group's rendezvous."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(
    train: Callable[..., dict[str, Any]],
    config: LaunchConfig,
    params: Any,
    inputs: "Paths",
    outputs: "Paths",
    env: "StageEnv",
) -> dict[str, Any]:
    """Run `train(params, inputs, outputs, env)` in `config.processes` processes; return the first
    process's summary.

    Args:
        train: the stage's train function (module level, so it pickles).
        config: the launch settings.
        params: the stage params.
        inputs: the stage inputs.
        outputs: the stage outputs.
        env: the stage environment (its publisher stays in this process).
    """
    worker_env = StageEnv(store=env.store, state_dir=env.state_dir, show_progress=env.show_progress)
    queue = mp.get_context("spawn").SimpleQueue()
    args = (
        train,
        config.processes,
        config.port or free_port(),
        config.gpu_ids,
        params,
        inputs,
        outputs,
        worker_env,
        queue,
    )
    context = mp.spawn(train_rank, args=args, nprocs=config.processes, join=False)
    messages: dict[str, Any] = {}
    try:
        while not context.join(timeout=0.2):
            relay(queue, env, messages)
    except mp.ProcessRaisedException:
        relay(queue, env, messages)
        if "error" in messages:
            kind, text = messages["error"]
            raise (kind if isinstance(kind, type) and issubclass(kind, Exception) else RuntimeError)(text) from None
        raise
    relay(queue, env, messages)
    return messages["summary"]


def relay(queue: Any, env: "StageEnv", messages: dict[str, Any]) -> None:
    """Hand the workers' queued tables and progress to the publisher; keep their summary or error.

    Args:
        queue: the workers' queue of (kind, payload) messages.
        env: the parent's stage environment (its publisher).
        messages: where `summary` and `error` are kept.
    """
    while not queue.empty():
        kind, payload = queue.get()
        if kind == "table":
            env.publish.table(*payload)
        elif kind == "progress":
            env.publish.progress(*payload)
        elif kind == "markdown":
            env.publish.markdown(*payload)
        else:  # summary, error
            messages.setdefault(kind, payload)


class QueuePublisher:
    """A worker's publisher: tables and progress go to the parent process through `queue`.

    Args:
        queue: the spawn queue the parent relays from.
    """

    def __init__(self, queue: Any) -> None:
        self.queue = queue

    def table(self, key: str, rows: list[dict[str, Any]], description: str = "") -> None:
        self.queue.put(("table", (key, [dict(r) for r in rows], description)))

    def markdown(self, key: str, text: str, description: str = "") -> None:
        self.queue.put(("markdown", (key, text, description)))

    def progress(self, fraction: float, description: str = "") -> None:
        self.queue.put(("progress", (fraction, description)))


def train_rank(
    rank: int,
    train: Callable[..., dict[str, Any]],
    world: int,
    port: int,
    gpu_ids: str | None,
    params: Any,
    inputs: "Paths",
    outputs: "Paths",
    env: "StageEnv",
    queue: Any,
) -> None:
    """One spawned process: join the process group as `rank` and train. The first process shows
    the bar, publishes through the queue and hands back the summary; any process's error goes
    to the queue before it is raised.

    Args:
        rank: this process's index.
        train: the stage's train function.
        world: the number of processes.
        port: the rendezvous port on 127.0.0.1.
        gpu_ids: CUDA_VISIBLE_DEVICES, or None for all.
        params: the stage params.
        inputs: the stage inputs.
        outputs: the stage outputs.
        env: item store, state folder (no publisher).
        queue: the messages to the parent.
    """
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    if gpu_ids is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu_ids
    if rank == 0:
        env = dataclasses.replace(env, publish=QueuePublisher(queue))
    else:
        env = dataclasses.replace(env, show_progress=False)
    try:
        summary = train(params, inputs, outputs, env)
    except Exception as error:
        queue.put(("error", (type(error), f"{error} (process {rank} of {world})")))
        raise
    if rank == 0:
        queue.put(("summary", summary))
