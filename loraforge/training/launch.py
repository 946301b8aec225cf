"""Data-parallel launch: this machine's processes through accelerate, set by
`finetune.num_processes` or by an accelerate config file (`finetune.accelerate_config`, read by
`loraforge.training.accelerate_config`), on one machine or several.

`launch` spawns this machine's processes (torch.multiprocessing); each sets RANK (its global rank:
machine_rank × local processes + its local index), LOCAL_RANK, WORLD_SIZE (all machines' processes)
and MASTER_ADDR/PORT (machine 0's address) and runs the stage's `train`, where accelerate builds
the process group (gloo on CPU, NCCL on GPUs). Each machine runs its own stage process, which
launches its own processes; the group forms once all of them have joined. The machine's first
process draws the terminal bar and sends its tables and progress through a queue to the parent,
which hands them to the publisher (a Prefect publisher may not pickle). A process's error is
raised in the parent with its own type and message; torch stops the machine's other processes at
once (and the other machines' processes fail at their next collective).
"""

from __future__ import annotations

import dataclasses
import os
import socket
from typing import Any, Callable

import torch.multiprocessing as mp

from loraforge.errors import InputError
from loraforge.store.fingerprint import hash_json
from loraforge.pipeline.runner import Paths, StageEnv
from loraforge.training.accelerate_config import LaunchConfig, launch_config

__all__ = ["LaunchConfig", "launch", "launch_config", "same_run"]


def same_run(accelerator: Any, run: dict[str, Any]) -> None:
    """Stop every process unless all of them (on every machine) train the same `run` (params and
    data); machines started from different commits, params.yaml or data would otherwise
    all-reduce unrelated gradients, or wait forever on a collective that differs.

    Args:
        accelerator: the Accelerator (its process group).
        run: what must be equal everywhere (JSON-able).
    """
    if accelerator.num_processes == 1:
        return
    from accelerate.utils import gather_object

    hashes = gather_object([hash_json(run)])  # one per global rank
    if len(set(hashes)) > 1:
        odd = [rank for rank, h in enumerate(hashes) if h != hashes[0]]
        raise InputError(
            f"finetune: processes {odd} train with other params or data than process 0 (run hashes {hashes}); "
            "every machine needs the same commit, params.yaml and inputs (`dvc pull`)"
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
    """Run `train(params, inputs, outputs, env)` in this machine's `config.processes` processes;
    return the summary of the machine's first process.

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
    if not config.port:  # one machine: any free port on the loopback
        config = dataclasses.replace(config, port=free_port())
    args = (
        train,
        config,
        params,
        inputs,
        outputs,
        worker_env,
        queue,
    )
    context = mp.spawn(train_rank, args=args, nprocs=config.processes, join=False)  # local ranks 0..processes-1
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
    local_rank: int,
    train: Callable[..., dict[str, Any]],
    config: LaunchConfig,
    params: Any,
    inputs: "Paths",
    outputs: "Paths",
    env: "StageEnv",
    queue: Any,
) -> None:
    """One spawned process: join the process group as global rank `config.first_rank + local_rank`
    and train. The machine's first process shows the bar, publishes through the queue and hands
    back the summary; any process's error goes to the queue before it is raised.

    Args:
        local_rank: this process's index on this machine.
        train: the stage's train function.
        config: the launch settings (machine rank, process counts, rendezvous address, GPUs).
        params: the stage params.
        inputs: the stage inputs.
        outputs: the stage outputs.
        env: item store, state folder (no publisher).
        queue: the messages to the parent.
    """
    rank, world = config.first_rank + local_rank, config.world
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(local_rank),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(config.processes),
        MASTER_ADDR=config.main_ip,
        MASTER_PORT=str(config.port),
    )
    if config.gpu_ids is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = config.gpu_ids
    if local_rank == 0:
        env = dataclasses.replace(env, publish=QueuePublisher(queue))
    else:
        env = dataclasses.replace(env, show_progress=False)
    try:
        summary = train(params, inputs, outputs, env)
    except Exception as error:
        queue.put(("error", (type(error), f"{error} (process {rank} of {world})")))
        raise
    if local_rank == 0:
        queue.put(("summary", summary))
