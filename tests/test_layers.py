"""The layering rules of ARCHITECTURE.md: server/store/protocol (and the vLLM client) never import torch;
engine never imports HTTP."""

import re
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "tinkerd"


def _imports(package: str) -> dict[str, set[str]]:
    found = {}
    for path in (SRC / package).rglob("*.py"):
        names = set(re.findall(r"^\s*(?:from|import)\s+([\w.]+)", path.read_text(), re.M))
        found[str(path.relative_to(SRC))] = names
    return found


def test_front_end_layers_never_import_torch():
    for package in ("server", "store", "protocol", "vllm"):
        for path, names in _imports(package).items():
            assert not {n for n in names if n.split(".")[0] in ("torch", "transformers")}, path


def test_engine_never_imports_http():
    for path, names in _imports("engine").items():
        bad = {n for n in names if n.split(".")[0] in ("fastapi", "starlette", "uvicorn", "httpx")
               or n.startswith("tinkerd.server")}
        assert not bad, (path, bad)


def test_importing_the_server_loads_no_torch():
    code = ("import sys, tinkerd.server.app, tinkerd.backends.vllm_sampler; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
