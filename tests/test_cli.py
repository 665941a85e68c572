"""`tinkerd runs | checkpoints | export` as subprocesses, on a data dir a tiny-model server filled in-process;
`tinkerd serve`'s thread settings on a tiny model folder."""

import json
import os
import subprocess
import sys

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from tinkerd.engine.runtime import ModelRuntime
from tinkerd.engine.sampler import LocalSampler
from tinkerd.engine.trainer import LocalTrainer
from tinkerd.server.app import create_app
from tinkerd.control.plane import ServerConfig
from tests.conftest import make_tiny_model

KEY = {"X-API-Key": "tml-cli"}


def _result(client, request_id):
    while True:
        body = client.post("/api/v1/retrieve_future", json={"request_id": request_id}, headers=KEY).json()
        if body.get("type") != "try_again":
            return body


def tinkerd(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "tinkerd.cli", *args], capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


@pytest.fixture(scope="module")
def populated(tmp_path_factory):
    """Two runs of a tiny base model served from a folder (so `export --merged` can find it by name)."""
    root = tmp_path_factory.mktemp("cli")
    base = root / "tiny-base"
    make_tiny_model(4).save_pretrained(base)
    runtime = ModelRuntime(str(base), make_tiny_model(4))
    data_dir = root / "data"
    app = create_app(ServerConfig(data_dir=data_dir, long_poll_seconds=5), LocalTrainer({runtime.name: runtime}),
                     LocalSampler({runtime.name: runtime}))
    out = {"data_dir": data_dir, "base": base, "runtime": runtime}
    with TestClient(app) as client:
        session = client.post("/api/v1/create_session", headers=KEY, json={"tags": []}).json()["session_id"]
        runs = []
        for seq, rank in [(0, 4), (1, 2)]:
            fut = client.post("/api/v1/create_model", headers=KEY, json={
                "session_id": session, "model_seq_id": seq, "base_model": runtime.name,
                "lora_config": {"rank": rank, "seed": seq}}).json()
            runs.append(_result(client, fut["request_id"])["model_id"])
        for name, p in runtime.lora.named_parameters(runs[0]):
            if name.endswith("lora_B"):
                p.data.normal_(std=0.2)
        for route, body in [("/api/v1/save_weights", {"path": "state", "seq_id": 1}),
                            ("/api/v1/save_weights_for_sampler", {"path": "snap", "seq_id": 2, "ttl_seconds": 7200})]:
            fut = client.post(route, headers=KEY, json={"model_id": runs[0], **body}).json()
            assert "error" not in _result(client, fut["request_id"])
        client.post(f"/api/v1/training_runs/{runs[0]}/checkpoints/sampler_weights/snap/publish", headers=KEY)
    out["runs"] = runs
    out["state"] = f"tinker://{runs[0]}/weights/state"
    out["snap"] = f"tinker://{runs[0]}/sampler_weights/snap"
    return out


def test_runs_lists_every_run_with_rank_and_checkpoint_count(populated):
    lines = tinkerd("runs", "--data-dir", str(populated["data_dir"])).stdout.splitlines()
    assert lines[0].split() == ["RUN", "ID", "BASE", "MODEL", "RANK", "CREATED", "CHECKPOINTS"]
    assert set(lines[1]) <= {"-", " "}
    first, second = (next(line for line in lines if line.startswith(run)) for run in populated["runs"])
    assert first.split()[1:3] == [str(populated["base"]), "4"] and first.split()[-1] == "2"
    assert second.split()[1:3] == [str(populated["base"]), "2"] and second.split()[-1] == "0"
    assert lines[0].index("RANK") == first.index(" 4 ") + 1  # columns line up


def test_checkpoints_lists_paths_kinds_sizes_public_and_expiry(populated):
    out = tinkerd("checkpoints", "--data-dir", str(populated["data_dir"])).stdout
    rows = {line.split()[0]: line.split() for line in out.splitlines()[2:]}
    assert set(rows) == {populated["state"], populated["snap"]}
    assert rows[populated["state"]][1] == "weights" and rows[populated["state"]][-1] == "never"
    assert rows[populated["state"]][-2] == "no" and rows[populated["snap"]][-3] == "yes"
    assert rows[populated["snap"]][1] == "sampler_weights" and rows[populated["snap"]][3] == "KB"
    only = tinkerd("checkpoints", "--run", populated["runs"][1], "--data-dir", str(populated["data_dir"])).stdout
    assert only.strip() == "no checkpoints"
    missing = tinkerd("checkpoints", "--run", "nope", "--data-dir", str(populated["data_dir"]), check=False)
    assert missing.returncode == 1 and "no training run 'nope'" in missing.stderr


def test_export_copies_the_peft_adapter(populated, tmp_path):
    out = tmp_path / "adapter"
    tinkerd("export", populated["state"], str(out), "--data-dir", str(populated["data_dir"]))
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4
    tensors = load_file(str(out / "adapter_model.safetensors"))
    expected = populated["runtime"].lora.export(populated["runs"][0])
    assert tensors.keys() == expected.keys() and all(torch.equal(tensors[k], expected[k]) for k in tensors)

    again = tinkerd("export", populated["state"], str(out), "--data-dir", str(populated["data_dir"]), check=False)
    assert again.returncode == 1 and "not an empty folder" in again.stderr
    unknown = tinkerd("export", "tinker://x/weights/y", str(tmp_path / "u"), "--data-dir", str(populated["data_dir"]),
                      check=False)
    assert unknown.returncode == 1 and "no checkpoint" in unknown.stderr and not (tmp_path / "u").exists()


def test_export_merged_writes_a_model_with_the_adapter_folded_in(populated, tmp_path):
    out = tmp_path / "merged"
    tinkerd("export", populated["snap"], str(out), "--merged", "--data-dir", str(populated["data_dir"]))
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokens = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    runtime = populated["runtime"]
    with torch.no_grad():
        expected = runtime.logits(tokens, torch.ones_like(tokens), [populated["runs"][0]])
        torch.testing.assert_close(merged(input_ids=tokens).logits, expected, atol=1e-4, rtol=1e-4)


def _tiny_model_folder(folder):
    """The tiny random model plus a word-level tokenizer ("t0".."t127"), servable by `tinkerd serve`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    make_tiny_model(4).save_pretrained(folder)
    tokenizer = Tokenizer(models.WordLevel({f"t{i}": i for i in range(128)}, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="t0", eos_token="t1").save_pretrained(folder)
    return folder


def test_serve_threads_are_parsed_and_applied_with_a_short_openmp_spin(tmp_path, monkeypatch):
    from tinkerd.cli import _parser, main
    from tinkerd.engine.threads import configure_threads
    from tinkerd.local_server import LocalServer

    args = _parser().parse_args(["serve", "--threads", "1", "--session-timeout", "60", "--parked-state-ttl", "0"])
    assert (args.threads, args.session_timeout, args.parked_state_ttl) == (1, 60.0, 0.0)
    assert _parser().parse_args(["serve"]).threads is None
    with pytest.raises(ValueError, match="threads must be >= 1"):
        configure_threads(0)
    with pytest.raises(SystemExit, match="--threads must be >= 1"):  # before anything loads
        main(["serve", "--threads", "0", "--data-dir", str(tmp_path / "unused")])
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    folder = _tiny_model_folder(tmp_path / "tiny")
    with LocalServer(tmp_path / "data", "--base-model", str(folder), "--threads", "1") as server:
        log = server.log_tail()
    assert "torch threads 1, inter-op threads 1, GOMP_SPINCOUNT=10000)" in log, log


def test_a_wait_policy_from_the_environment_is_kept():
    code = "from tinkerd.engine.threads import configure_threads; print(configure_threads(None))"
    env = {**os.environ, "OMP_WAIT_POLICY": "ACTIVE"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert out.strip().endswith("OMP_WAIT_POLICY=ACTIVE"), out
