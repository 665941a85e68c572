"""The `tinkerd` command: `serve` the API, `tune` a file into an adapter (`tinkerd.jobs.tune`), and offline views
of a data dir: `runs`, `checkpoints`, `export`.

`serve` opens the Store (`DATA_DIR/tinkerd.sqlite3`, or `--store URL`: SQLite or PostgreSQL), loads
the base model(s) and starts the HTTP server. `runs` and `checkpoints` print plain aligned tables
read straight from the same Store (every owner's rows; safe while the server runs, SQLite WAL allows
concurrent readers). `export` copies a checkpoint's PEFT adapter files to a folder, or with
`--merged` writes a full Hugging Face model (base + adapter, `tinkerd.engine.merge`), resolving the
base model the way `serve` does. These commands never change the Store. They show owners only as
the key hashes the server stores.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path


STORE_HELP = ("where sessions, runs, futures and checkpoint records live: postgresql://USER[:PASSWORD]@HOST[:PORT]/DB "
              "(needs tinkerd[postgres]), or sqlite:///PATH (relative; sqlite:////PATH for an absolute path). "
              "Default: SQLite at DATA_DIR/tinkerd.sqlite3. Checkpoint files always go under DATA_DIR")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tinkerd", description="A self-hostable server for the Tinker API.")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve the Tinker API")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--data-dir", type=Path, default=Path(os.environ.get("TINKERD_DATA_DIR", "~/.cache/tinkerd")),
                       help="Store, checkpoints and converted models (default ~/.cache/tinkerd)")
    serve.add_argument("--model-cache", type=Path, default=None,
                       help="where converted base models live (default DATA_DIR/models)")
    serve.add_argument("--store", metavar="URL", default=None, help=STORE_HELP)
    serve.add_argument("--base-model", action="append", default=None, metavar="PATH_OR_HUB_ID",
                       help="a Hugging Face causal LM folder, NAME=FOLDER, or a hub id already in the local cache; "
                            "repeatable (default: the embedded HuggingFaceTB/SmolLM2-135M-Instruct)")
    serve.add_argument("--api-key", action="append", default=[], help="accepted API key (repeatable)")
    serve.add_argument("--api-keys-file", type=Path,
                       help="file with one accepted API key per line, optionally followed by its name (KEY NAME); "
                            "# starts a comment")
    serve.add_argument("--admin-key", action="append", default=[],
                       help="an accepted API key that also reads every key's audit log (repeatable)")
    serve.add_argument("--no-token-auth", action="store_true",
                       help="SDK clients send their API key on every request instead of exchanging it for a "
                            "short-lived token (RestClient.whoami then does not work)")
    serve.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto",
                       help="compute dtype of the frozen base weights (LoRA masters and Adam state stay fp32); "
                            "auto (default): bf16 where the hardware multiplies it natively (CUDA, or a CPU with "
                            "AVX-512 BF16 / AMX), else fp32, which is many times faster than emulated bf16")
    serve.add_argument("--device", default="cpu")
    serve.add_argument("--max-pending-samples", type=int, default=1024,
                       help="sampling requests in flight before asample answers 429 (the SDK backs off and retries)")
    serve.add_argument("--max-sampler-rows", type=int, default=256, metavar="N",
                       help="sample rows (num_samples each request) decoding at once, all keys together; more "
                            "requests wait (queue_state paused_capacity), keys taking turns; 0: no limit")
    serve.add_argument("--max-runs-per-key", type=int, default=0, metavar="N",
                       help="a key's request creating a training run waits (queue_state paused_rate_limit) while N "
                            "of its runs are loaded; 0 (default): no limit")
    serve.add_argument("--max-queued-sample-tokens-per-key", type=int, default=0, metavar="N",
                       help="a key's sample requests wait (queue_state paused_rate_limit) while its requests in the "
                            "sampler hold N tokens (num_samples x (prompt + max_tokens)); 0 (default): no limit")
    serve.add_argument("--max-body-bytes", type=int, default=256 * 1024 * 1024, metavar="BYTES",
                       help="largest request body as sent (compressed or not); larger answer 400")
    serve.add_argument("--max-decompressed-bytes", type=int, default=64 * 1024 * 1024, metavar="BYTES",
                       help="largest a zstd body may expand to, and a sparse tensor once dense (400 beyond)")
    serve.add_argument("--max-topk-logprobs", type=int, default=128, metavar="K",
                       help="largest topk_prompt_logprobs / topk_sample_logprobs of a sample request (400 beyond)")
    serve.add_argument("--threads", type=int, default=None, metavar="N",
                       help="torch compute threads (and inter-op threads); default: torch's (one per core). "
                            "Lower it when other processes share the cores")
    serve.add_argument("--session-timeout", type=float, default=600.0, metavar="SECONDS",
                       help="a session with no heartbeat and no training request this long has its training runs "
                            "unloaded from memory, their exact state kept on disk and restored on their next request "
                            "(default 600; 0: never)")
    serve.add_argument("--parked-state-ttl", type=float, default=86400.0, metavar="SECONDS",
                       help="how long that state is kept after the session's last sign of life (default 86400; "
                            "0: keep none, later requests on those runs answer 410)")
    serve.add_argument("--shutdown-park-seconds", type=float, default=300.0, metavar="SECONDS",
                       help="on SIGTERM/Ctrl-C, write every loaded training run's exact state to DATA_DIR/unloaded "
                            "(after the queued work) and wait up to this long for it; the next start resumes each "
                            "run on its next request (default 300; 0: park nothing, unsaved state is lost)")
    serve.add_argument("--restore-point-every", "--snapshot-every", dest="restore_point_every", type=int, default=10,
                       metavar="STEPS",
                       help="crash safety: keep every training request in a journal in the store and write a restore "
                            "point of each run (its exact state, under DATA_DIR/snapshots) every STEPS optim_steps; "
                            "after a kill -9 or power loss the next start rebuilds each run from its restore point and "
                            "journal and answers the requests that were in flight (default 10; 0: no journal, such "
                            "runs are lost). --snapshot-every is its older name")
    serve.add_argument("--eager-norms", action="store_true",
                       help="run RMSNorm layers in eager mode instead of compiling them at start (a few seconds "
                            "faster start, ~13 %% slower training steps; also where no C++ compiler is installed, "
                            "which is detected and falls back to this by itself)")
    serve.add_argument("--packed-gemms", choices=["auto", "on", "off"], default="auto",
                       help="multiply the frozen base weights' forward with a copy prepacked for oneDNN on CPU "
                            "(sampling ~1.5x faster at batch 16 on an AMD AVX2 CPU; training steps a few %% faster) "
                            "at the linear weights' memory once more; auto (default): fp32 on CPU when that fits in "
                            "a quarter of the RAM")
    serve.add_argument("--batch-gather-ms", type=float, default=50.0, metavar="MS",
                       help="how long a multi-tenant forward batch waits for the next request of each tenant of the "
                            "previous batch before it runs without it (default 50; 0: never wait)")
    serve.add_argument("--sampler", choices=["local", "vllm"], default="local",
                       help="who samples: the embedded sampler (default), or a vLLM server (--vllm-url) that loads "
                            "each adapter version tinkerd writes under DATA_DIR/adapters (docs/scale-out.md)")
    serve.add_argument("--vllm-url", metavar="URL", help="the vLLM OpenAI-compatible server, e.g. http://gpu1:8000")
    serve.add_argument("--vllm-model", metavar="NAME", help="vLLM's name for the base model (its --served-model-name; "
                                                           "default: tinkerd's base model name)")
    serve.add_argument("--vllm-keep-versions", type=int, default=8, metavar="N",
                       help="adapter versions per training run that sampling clients may keep using (default 8)")
    serve.add_argument("--engine", choices=["embedded", "ray"], default="embedded",
                       help="where the engine runs: in this process (default), or one Ray actor per base model "
                            "(needs tinkerd[ray]; this process then never imports torch; docs/scale-out.md)")
    serve.add_argument("--ray-address", metavar="ADDR", default=None,
                       help="with --engine ray: the Ray cluster to join (e.g. 10.0.0.5:6379 from `ray start --head`); "
                            "its detached engine actors outlive this process. Default: a private local cluster")
    serve.add_argument("--trainer-ranks", type=int, default=1, metavar="N",
                       help="with N > 1 (embedded engine, CPU): train in an FSDP2 group of N processes over gloo, the "
                            "base model sharded over them; this process keeps a copy for sampling the adapter version "
                            "folders (docs/scale-out.md). --threads is then per rank (default 1)")
    serve.add_argument("--jobs-per-key", type=int, default=1, metavar="N",
                       help="task-level jobs (POST /api/v1/jobs, docs/jobs.md) running at once per API key; the rest "
                            "queue (default 1; 0: no limit)")
    serve.add_argument("--job-max-file-mb", type=float, default=32.0, metavar="MB",
                       help="largest data file a job may bring, inline or uploaded (default 32)")
    serve.add_argument("--file-quota-mb", type=float, default=1024.0, metavar="MB",
                       help="the bytes of all the files one API key may keep uploaded (POST /api/v1/files; default "
                            "1024; 0: no limit)")
    serve.add_argument("--log-level", default="info")

    from tinkerd.jobs.tune import add_arguments as tune_arguments

    tune_arguments(sub.add_parser("tune", help="hand tinkerd a data file (sft, dpo, or rl with a grader) and get back "
                                               "a tuned adapter that is measurably better (docs/jobs.md)"))
    runs = sub.add_parser("runs", help="list training runs (every API key's) with their checkpoint counts")
    _data_dir_arg(runs)
    checkpoints = sub.add_parser("checkpoints", help="list checkpoints: path, kind, size, created, public, expires")
    checkpoints.add_argument("--run", metavar="RUN_ID", help="only this training run's checkpoints")
    _data_dir_arg(checkpoints)
    export = sub.add_parser("export", help="copy a checkpoint's PEFT adapter to a folder, or merge it into its base")
    export.add_argument("tinker_path", metavar="TINKER_PATH", help="tinker://<run>/<kind>/<name>")
    export.add_argument("out_dir", metavar="OUT_DIR", type=Path, help="folder to create (must not exist or be empty)")
    export.add_argument("--merged", action="store_true",
                        help="write a full Hugging Face model folder: base model + adapter, plus the tokenizer")
    export.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32",
                        help="dtype of the merged weights (the merge itself runs in fp32)")
    export.add_argument("--base-model", metavar="PATH_OR_HUB_ID", default=None,
                        help="base model for --merged, as for serve (default: the checkpoint's base model name)")
    export.add_argument("--model-cache", type=Path, default=None,
                        help="where converted base models live (default DATA_DIR/models)")
    _data_dir_arg(export)
    return parser


def _data_dir_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", type=Path, default=Path(os.environ.get("TINKERD_DATA_DIR", "~/.cache/tinkerd")),
                        help="the server's data dir (default ~/.cache/tinkerd)")
    parser.add_argument("--store", metavar="URL", default=None, help="the server's --store, if it was given one")


def serve(args: argparse.Namespace) -> None:
    from tinkerd.backends.assemble import EngineOptions, assemble, check_options
    from tinkerd.control.datadir import DataDir
    from tinkerd.store.db import StoreError, open_store

    data_dir = args.data_dir.expanduser()
    paths = DataDir(data_dir)
    options = EngineOptions(
        base_models=tuple(args.base_model or [None]), model_cache=(args.model_cache or paths.models).expanduser(),
        versions_root=paths.versions, engine=args.engine, sampler=args.sampler, dtype=args.dtype,
        device=args.device, threads=args.threads, eager_norms=args.eager_norms, packed_gemms=args.packed_gemms,
        trainer_ranks=args.trainer_ranks, ray_address=args.ray_address, vllm_url=args.vllm_url,
        vllm_model=args.vllm_model, vllm_keep_versions=args.vllm_keep_versions)
    try:
        check_options(options)
    except ValueError as exc:
        raise SystemExit(f"tinkerd serve: {exc}") from None
    try:  # before loading anything heavy: a bad URL or an unreachable database fails at once
        store = open_store(args.store, data_dir)
    except StoreError as exc:
        raise SystemExit(f"tinkerd serve: --store: {exc}") from None
    import uvicorn

    from tinkerd.control.plane import ServerConfig
    from tinkerd.server.app import create_app

    names = read_keys_file(args.api_keys_file) if args.api_keys_file else {}
    keys = set(args.api_key) | set(names) | (set(args.admin_key) if args.api_key or names else set())
    engine = assemble(options)
    config = ServerConfig(data_dir=data_dir, api_keys=frozenset(keys), key_names=names,
                          admin_keys=frozenset(args.admin_key), token_auth=not args.no_token_auth,
                          max_pending_samples=args.max_pending_samples,
                          max_queued_sample_tokens_per_key=args.max_queued_sample_tokens_per_key,
                          max_runs_per_key=args.max_runs_per_key,
                          max_sampler_rows=args.max_sampler_rows,
                          store=args.store, session_timeout_seconds=args.session_timeout,
                          parked_state_ttl_seconds=args.parked_state_ttl,
                          batch_gather_seconds=args.batch_gather_ms / 1000,
                          shutdown_park_seconds=args.shutdown_park_seconds,
                          restore_point_every_steps=args.restore_point_every, max_body_bytes=args.max_body_bytes,
                          max_decompressed_bytes=args.max_decompressed_bytes,
                          max_topk_logprobs=args.max_topk_logprobs,
                          jobs_url=f"http://{'127.0.0.1' if args.host in ('0.0.0.0', '::', '') else args.host}"
                                   f":{args.port}",
                          jobs_per_key=args.jobs_per_key, job_max_file_bytes=int(args.job_max_file_mb * 2**20),
                          file_quota_bytes=int(args.file_quota_mb * 2**20))
    app = create_app(config, engine.trainer, engine.sampler, store)
    logging.getLogger("tinkerd").info("serving %s on http://%s:%d (store: %s; %s)", ", ".join(engine.names),
                                      args.host, args.port, store.description, engine.where)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False)
    finally:
        store.close()


def read_keys_file(path: Path) -> dict[str, str | None]:
    """`KEY [NAME...]` per line (blank lines and `#` comments skipped): each key and its name, if any."""
    out: dict[str, str | None] = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            key, _, name = line.partition(" ")
            out[key] = name.strip() or None
    return out


class CommandError(Exception):
    """A user error of an offline command: printed without a traceback, exit status 1."""


def _open_store(args: argparse.Namespace):
    from tinkerd.store.db import DEFAULT_FILE, StoreError, open_store
    from tinkerd.store.dialects import parse_store_url

    data_dir = args.data_dir.expanduser()
    try:
        kind, where = parse_store_url(args.store) if args.store else ("sqlite", data_dir / DEFAULT_FILE)
        if kind == "sqlite" and not where.is_file():  # never create an empty store
            raise CommandError(f"no tinkerd store at {where} (pass --data-dir or --store, or set TINKERD_DATA_DIR)")
        return open_store(args.store, data_dir)
    except StoreError as exc:
        raise CommandError(f"--store: {exc}") from None


def _when(t: float | None) -> str:
    import time

    return "-" if t is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def _size(directory: str) -> str:
    path = Path(directory)
    if not path.exists():
        return "missing"
    total = path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    for unit in ("B", "KB", "MB", "GB"):
        if total < 1024 or unit == "GB":
            return f"{total:.0f} {unit}" if unit == "B" else f"{total:.1f} {unit}"
        total /= 1024
    return ""


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in column) for column in zip(headers, *rows)]
    lines = [headers, ["-" * w for w in widths], *rows]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines)


def list_runs(args: argparse.Namespace) -> str:
    store = _open_store(args)
    try:
        models = store.all_models()
        counts = store.checkpoint_counts()
    finally:
        store.close()
    rows = [[m["id"], m["base_model"], str((m["lora_config"] or {}).get("rank", "-")), _when(m["created"]),
             str(counts.get(m["id"], 0))] for m in models]
    if not rows:
        return "no training runs"
    return _table(["RUN ID", "BASE MODEL", "RANK", "CREATED", "CHECKPOINTS"], rows)


def list_checkpoints(args: argparse.Namespace) -> str:
    import time

    store = _open_store(args)
    try:
        if args.run:
            if store.model(args.run) is None and not store.model_checkpoints(args.run):
                raise CommandError(f"no training run {args.run!r} in {args.data_dir}")
            rows = store.model_checkpoints(args.run)
        else:
            rows = store.all_checkpoints()
    finally:
        store.close()
    now = time.time()

    def expires(row: dict) -> str:
        at = row.get("expires_at")
        return "never" if at is None else _when(at) + (" (expired)" if at <= now else "")

    table = [[r["path"], r["kind"], _size(r["directory"]), _when(r["created"]), "yes" if r["public"] else "no",
              expires(r)] for r in rows]
    if not table:
        return "no checkpoints"
    return _table(["PATH", "KIND", "SIZE", "CREATED", "PUBLIC", "EXPIRES"], table)


ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def export(args: argparse.Namespace) -> str:
    import shutil
    import tempfile
    import time

    store = _open_store(args)
    try:
        row = store.checkpoint(args.tinker_path)
    finally:
        store.close()
    if row is None:
        raise CommandError(f"no checkpoint {args.tinker_path!r} in {args.data_dir} (see `tinkerd checkpoints`)")
    if row.get("expires_at") is not None and row["expires_at"] <= time.time():
        raise CommandError(f"checkpoint {args.tinker_path!r} has expired")
    source = Path(row["directory"])
    missing = [f for f in ADAPTER_FILES if not (source / f).is_file()]
    if missing:
        raise CommandError(f"checkpoint folder {source} lacks {', '.join(missing)}")
    out = args.out_dir.expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CommandError(f"{out} exists and is not an empty folder")
    if args.merged:
        from tinkerd.engine.base_models import resolve_base_model
        from tinkerd.engine.merge import merge_adapter_into_model

        model_cache = (args.model_cache or args.data_dir / "models").expanduser()
        spec = args.base_model or row["base_model"]
        try:
            files = resolve_base_model(spec, model_cache)
        except (ValueError, FileNotFoundError) as exc:
            raise CommandError(f"cannot find base model {spec!r}: {exc} (pass --base-model PATH)") from exc
        if out.exists():
            out.rmdir()
        merge_adapter_into_model(files.folder, source, out, dtype=args.dtype)
        return f"wrote {out}: {row['base_model']} merged with {args.tinker_path} ({args.dtype})"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".export-", dir=out.parent))
    try:
        for name in ADAPTER_FILES:
            shutil.copyfile(source / name, tmp / name)
        if out.exists():
            out.rmdir()
        tmp.replace(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return f"wrote {out}: PEFT adapter of {args.tinker_path} (base model {row['base_model']})"


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    log_level = getattr(args, "log_level", "warning")
    logging.basicConfig(level=getattr(logging, log_level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if args.command == "serve":
        serve(args)
        return
    if args.command == "tune":
        from tinkerd.jobs.tune import tune

        raise SystemExit(tune(args))
    commands = {"runs": list_runs, "checkpoints": list_checkpoints, "export": export}
    try:
        print(commands[args.command](args))
    except CommandError as exc:
        print(f"tinkerd {args.command}: {exc}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
