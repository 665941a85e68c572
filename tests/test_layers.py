"""The layers of ARCHITECTURE.md, read from the code's own imports (every `import` / `from ... import`, also
inside functions):

    cli -> backends, server, control (datadir), store
    server -> control, engine.interface, store, protocol      (HTTP only; never torch)
    control -> engine.interface, store, protocol              (no torch, no HTTP)
    backends -> engine, protocol                               (never control/ or server/)
    engine -> protocol                                         (never backends/, control/, server/, HTTP)
    store, protocol -> nothing of tinkerd's above them; never torch
    jobs (the job runner, a client of the server) -> control.jobs' pure rules only; nothing imports jobs but cli
    nothing imports cli
"""

import ast
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "tinkerd"
TORCH = {"torch", "transformers", "peft", "safetensors.torch"}
HTTP = {"fastapi", "starlette", "uvicorn"}


def imports_of(path: Path) -> set[str]:
    """Every module a file imports, relative imports resolved, `from a import b` also as `a.b`."""
    package = ".".join(("tinkerd", *path.relative_to(SRC).parent.parts))
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}
    return found


def layer_imports(layer: str) -> dict[str, set[str]]:
    root = SRC / layer if (SRC / layer).is_dir() else SRC / f"{layer}.py"
    files = root.rglob("*.py") if root.is_dir() else [root]
    return {str(p.relative_to(SRC)): imports_of(p) for p in files}


def violations(layer: str, allowed_tinkerd: tuple[str, ...], forbidden_roots: set[str] = frozenset()) -> list:
    """(file, import) pairs of `layer` that reach a tinkerd module outside `allowed_tinkerd` prefixes (its own
    layer is always allowed) or a third-party root in `forbidden_roots`."""
    own = f"tinkerd.{layer}"
    bad = []
    for path, names in layer_imports(layer).items():
        for name in names:
            if name.startswith("tinkerd.") or name == "tinkerd":
                if name == "tinkerd" or name.startswith(own + ".") or name == own:
                    continue
                if not any(name == a or name.startswith(a + ".") for a in allowed_tinkerd):
                    bad.append((path, name))
            elif any(name == f or name.startswith(f + ".") for f in forbidden_roots):
                bad.append((path, name))
    return sorted(bad)


ENGINE_SEAM = ("tinkerd.engine.interface",)


def test_server_speaks_http_and_reaches_the_engine_only_through_its_interface():
    assert violations("server", ("tinkerd.control", "tinkerd.store", "tinkerd.protocol", *ENGINE_SEAM),
                      TORCH) == []


def test_control_plane_has_neither_torch_nor_http():
    assert violations("control", ("tinkerd.store", "tinkerd.protocol", *ENGINE_SEAM), TORCH | HTTP) == []


def test_backends_never_reach_up_into_the_control_plane_or_the_server():
    assert violations("backends", ("tinkerd.engine", "tinkerd.protocol"), HTTP - {"httpx"}) == []


def test_engine_is_the_compute_core_only():
    assert violations("engine", ("tinkerd.protocol",), HTTP | {"httpx", "ray"}) == []


def test_store_and_protocol_stand_alone_without_torch():
    assert violations("store", (), TORCH | HTTP) == []
    assert violations("protocol", (), TORCH | HTTP) == []


def test_the_job_runner_is_a_client_and_nobody_imports_it():
    """A job talks to the server through the SDK and the job routes, never through its insides; the server starts
    it as a process by module name."""
    assert violations("jobs", ("tinkerd.control.jobs.plan", "tinkerd.local_server")) == []
    for layer in ("server", "control", "backends", "engine", "store", "protocol"):
        assert [(p, n) for p, names in layer_imports(layer).items() for n in names if n.startswith("tinkerd.jobs")] == []


def test_nothing_imports_the_command_line():
    for layer in ("server", "control", "backends", "engine", "store", "protocol"):
        assert [(p, n) for p, names in layer_imports(layer).items() for n in names if n.startswith("tinkerd.cli")] == []


def test_the_checker_sees_a_deliberate_violation(tmp_path, monkeypatch):
    """The rules above are not vacuous: an engine module importing the control plane is caught."""
    bad = SRC / "engine" / "_layer_probe.py"
    bad.write_text("def f():\n    from tinkerd.control import scheduler\n    from ..server import app\n")
    try:
        assert violations("engine", ("tinkerd.protocol",)) == [
            ("engine/_layer_probe.py", "tinkerd.control"), ("engine/_layer_probe.py", "tinkerd.control.scheduler"),
            ("engine/_layer_probe.py", "tinkerd.server"), ("engine/_layer_probe.py", "tinkerd.server.app")]
    finally:
        bad.unlink()


def test_importing_the_server_loads_no_torch():
    code = ("import sys, tinkerd.server.app, tinkerd.backends.vllm_sampler, tinkerd.backends.assemble; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_recovery_knows_every_kind_of_request_without_the_routes():
    """The journal's kinds are registered by `control.ops`, which `control.recovery` imports itself."""
    code = ("from tinkerd.control import recovery, ops; "
            "assert {'create_model', 'load_weights', 'forward', 'forward_backward', 'optim_step', "
            "'save_weights_for_sampler', 'save_weights', 'save_weights_external'} <= set(ops.KINDS), ops.KINDS; "
            "import sys; assert 'tinkerd.server.routes.training' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
