"""The `loraforge` command line.

loraforge stage NAME [--wait]  run one stage (what dvc.yaml's cmd calls), holding the project lock
loraforge run [--force] [--wait]  run the whole pipeline as a Prefect flow; prints computed/cached per stage
loraforge sync-dvc [--check]  write dvc.yaml from pipeline.yaml (or fail when it is stale)
loraforge sync-docs [--check]  write docs/params.md from the params schemas (or fail when it is stale)
loraforge check             validate params.yaml against every stage's schema
loraforge ui [--port N] [--host H]   start the Prefect server (and UI) on 127.0.0.1 (or H), port N
loraforge plan              the guides' steps arithmetic for the ingested dataset (reports/plan.json)
loraforge compare EXP...    side-by-side page of DVC experiments or run folders (reports/compare/)
loraforge extract --base A --tuned B --out X   a LoRA from two models, outside the pipeline
loraforge resize IN --rank N --out Y           resize any kohya LoRA, outside the pipeline
loraforge import-kohya CONFIG [--dataset-config TOML] [--dry-run]   params.yaml from a kohya_ss / sd-scripts config
loraforge du                the item store's size by kind (.loraforge/store)
"""

from __future__ import annotations

import argparse
import os
import sys

from loraforge.errors import StopRun
from loraforge.pipeline.params import load_all_params
from loraforge.pipeline.spec import PIPELINE_FILE, find_root, load_pipeline


def command_line() -> str:
    """This process's command, as the project lock's holder line shows it."""
    return " ".join(["loraforge", *sys.argv[1:]])


def cmd_stage(args: argparse.Namespace) -> int:
    from loraforge.pipeline.lock import project_lock
    from loraforge.pipeline.runner import STATE_DIR, run_stage

    root = find_root()
    if args.machine_rank:  # another machine's process writes under .loraforge/machine-N only
        manifest = run_stage(root, args.name, machine_rank=args.machine_rank)
    else:
        with project_lock(root / STATE_DIR, command_line(), wait=args.wait):
            manifest = run_stage(root, args.name, machine_rank=args.machine_rank)
    r = manifest["report"]
    print(f"{args.name}: {r['items']} items, {r['computed']} computed, {r['reused']} reused, {r['seconds']:.1f}s")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from flows.pipeline import run_pipeline
    from loraforge.pipeline.lock import project_lock
    from loraforge.pipeline.runner import STATE_DIR

    root = find_root()
    with project_lock(root / STATE_DIR, command_line(), wait=args.wait):
        results = run_pipeline(root, force=args.force)
    width = max(len(name) for name in results)
    for name, status in results.items():
        print(f"{name:<{width}}  {status}")
    return 0


def cmd_sync_dvc(args: argparse.Namespace) -> int:
    from loraforge.pipeline.dvcgen import DVC_FILE, sync

    root = find_root()
    if args.check:
        if sync(root, check=True):
            print(f"{DVC_FILE} is up to date with {PIPELINE_FILE}")
            return 0
        print(f"{DVC_FILE} is stale: run `loraforge sync-dvc` and commit it", file=sys.stderr)
        return 1
    sync(root)
    print(f"wrote {root / DVC_FILE}")
    return 0


def cmd_sync_docs(args: argparse.Namespace) -> int:
    from loraforge.pipeline.params_doc import REFERENCE_FILE, sync_reference

    root = find_root()
    pipeline = load_pipeline(root)
    if args.check:
        if sync_reference(root, pipeline, check=True):
            print(f"{REFERENCE_FILE} is up to date with the params schemas")
            return 0
        print(f"{REFERENCE_FILE} is stale: run `loraforge sync-docs` and commit it", file=sys.stderr)
        return 1
    sync_reference(root, pipeline)
    print(f"wrote {root / REFERENCE_FILE}")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    root = find_root()
    pipeline = load_pipeline(root)
    load_all_params(root, pipeline)
    if args.fingerprint:  # dvc.yaml's guard stage: the hashes of the files params point at
        from loraforge.pipeline.filedeps import write_fingerprints
        from loraforge.models.weights import HASH_CACHE, HashCache
        from loraforge.pipeline.params import read_params_file
        from loraforge.pipeline.runner import STATE_DIR

        cache = HashCache(root / STATE_DIR / HASH_CACHE)
        write_fingerprints(root, list(pipeline.stages.values()), read_params_file(root), cache)
        cache.save()
    print("params.yaml is valid for every stage")
    return 0


def cmd_du(args: argparse.Namespace) -> int:
    from loraforge.pipeline.runner import STATE_DIR
    from loraforge.store.usage import store_usage, usage_table

    root = find_root() / STATE_DIR / "store"
    usage = store_usage(root)
    print(f"{root}:\n{usage_table(usage)}" if usage else f"{root}: empty (nothing cached yet)")
    return 0


def ui_environment(host: str, port: int) -> dict[str, str]:
    """The Prefect server's environment for `loraforge ui`: its own host and port, and the API
    URL its UI hands the browser (`/ui-settings`) pointing at that same server: without it the
    UI calls the default 127.0.0.1:4200 whatever port the server listens on.

    Args:
        host: the address the server binds to.
        port: its port.
    """
    return {
        **os.environ,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_API_HOST": host,
        "PREFECT_SERVER_API_PORT": str(port),
        "PREFECT_UI_API_URL": f"http://{host}:{port}/api",
    }


def cmd_ui(args: argparse.Namespace) -> int:
    url = f"http://{args.host}:{args.port}"
    print(f"Prefect UI: {url}\nIn another shell: export PREFECT_API_URL={url}/api && loraforge run")
    command = [sys.executable, "-m", "prefect", "server", "start", "--host", args.host, "--port", str(args.port)]
    sys.stdout.flush()
    os.execve(sys.executable, command, ui_environment(args.host, args.port))  # the server takes this process
    return 0  # not reached: a signal to this pid now reaches the server, which leaves no orphan behind


def add_wait_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--wait",
        action="store_true",
        help="when another loraforge run holds the project, wait for it instead of stopping",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loraforge", description="Stable Diffusion LoRA training as one reproducible pipeline."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("stage", help="run one stage (dvc.yaml calls this)")
    p.add_argument("name")
    p.add_argument(
        "--machine-rank",
        type=int,
        default=None,
        help="multi-machine training: this machine's rank (overrides the accelerate config's `machine_rank`); "
        "a rank above 0 writes its outputs under .loraforge/machine-<rank>/, never the pipeline's",
    )
    add_wait_option(p)
    p.set_defaults(func=cmd_stage)

    p = sub.add_parser("run", help="run the pipeline as a Prefect flow; unchanged stages come from cache")
    p.add_argument("--force", action="store_true", help="ignore the stage cache and recompute every stage")
    add_wait_option(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("sync-dvc", help="generate dvc.yaml from pipeline.yaml")
    p.add_argument("--check", action="store_true", help="exit 1 when dvc.yaml is stale, without writing")
    p.set_defaults(func=cmd_sync_dvc)

    p = sub.add_parser("sync-docs", help="generate docs/params.md from the params schemas")
    p.add_argument("--check", action="store_true", help="exit 1 when docs/params.md is stale, without writing")
    p.set_defaults(func=cmd_sync_docs)

    p = sub.add_parser("check", help="validate params.yaml")
    p.add_argument(
        "--fingerprint", action="store_true", help="also write reports/inputs/<stage>.json (dvc.yaml's `check` stage)"
    )
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("du", help="the item store's size by kind (.loraforge/store)")
    p.set_defaults(func=cmd_du)

    p = sub.add_parser("ui", help="start the Prefect server and UI (on 127.0.0.1 unless --host names another)")
    p.add_argument("--port", type=int, default=4200)
    p.add_argument("--host", default="127.0.0.1", help="the address to bind; 0.0.0.0 exposes the UI to the network")
    p.set_defaults(func=cmd_ui)

    from loraforge.evaluation.compare import add_compare_command
    from loraforge.kohya.importer import add_import_kohya_command
    from loraforge.lora.commands import add_extract_command, add_resize_command
    from loraforge.planning.command import add_plan_command

    add_plan_command(sub)
    add_compare_command(sub)
    add_extract_command(sub)
    add_resize_command(sub)
    add_import_kohya_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command; an expected stop (`loraforge.errors.StopRun`) is printed as
    `loraforge: <message>` with exit code 2, and no traceback unless `LORAFORGE_DEBUG=1`."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except StopRun as e:
        if os.environ.get("LORAFORGE_DEBUG") == "1":
            raise
        print(f"loraforge: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
