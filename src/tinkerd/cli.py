"""`tinkerd serve`: load the base model(s), open the Store, start the HTTP server."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path


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
    serve.add_argument("--base-model", action="append", default=None, metavar="PATH_OR_HUB_ID",
                       help="a Hugging Face causal LM folder, NAME=FOLDER, or a hub id already in the local cache; "
                            "repeatable (default: the embedded HuggingFaceTB/SmolLM2-135M-Instruct)")
    serve.add_argument("--api-key", action="append", default=[], help="accepted API key (repeatable)")
    serve.add_argument("--api-keys-file", type=Path, help="file with one accepted API key per line")
    serve.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16",
                       help="compute dtype of the frozen base weights (LoRA masters and Adam state stay fp32)")
    serve.add_argument("--device", default="cpu")
    serve.add_argument("--log-level", default="info")
    return parser


def serve(args: argparse.Namespace) -> None:
    import uvicorn

    from tinkerd.engine.base_models import resolve_base_model
    from tinkerd.engine.runtime import ModelRuntime
    from tinkerd.engine.sampler import LocalSampler
    from tinkerd.engine.trainer import LocalTrainer
    from tinkerd.server.app import create_app
    from tinkerd.server.state import ServerConfig

    data_dir = args.data_dir.expanduser()
    model_cache = (args.model_cache or data_dir / "models").expanduser()
    keys = set(args.api_key)
    if args.api_keys_file:
        keys |= {line.strip() for line in args.api_keys_file.read_text().splitlines() if line.strip()}
    runtimes = {}
    for spec in args.base_model or [None]:
        files = resolve_base_model(spec, model_cache)
        runtimes[files.name] = ModelRuntime.load(files, dtype=args.dtype, device=args.device)
    config = ServerConfig(data_dir=data_dir, api_keys=frozenset(keys))
    app = create_app(config, LocalTrainer(runtimes), LocalSampler(runtimes))
    logging.getLogger("tinkerd").info("serving %s on http://%s:%d", ", ".join(runtimes), args.host, args.port)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False)


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if args.command == "serve":
        serve(args)


if __name__ == "__main__":
    main()
