"""Hypothesis-generated bodies aimed at the numbers and shapes of the SDK's requests: sample requests,
optimizer steps, JSON forward bodies and forward_backward protobufs (dense and sparse tensors, zstd or not,
truncated or not), with edge values (int64 and uint64 bounds, NaN, infinities, strings, booleans) where
numbers belong. Every reply passes `check_reply`; afterwards the run still trains and the sampler still
samples (a bad request hurt nobody)."""

from __future__ import annotations

import json

import numpy as np
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tinkerd.protocol.wire_pb import pb
from tests.fuzz.app import MODEL, result, started
from tests.fuzz.conftest import KEY, check_reply

SETTINGS = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))
EDGE_INTS = [0, 1, -1, 2, 127, 128, 2**31 - 1, 2**31, 2**63 - 1, 2**63, 2**64 - 1, 2**64, -2**63, -2**63 - 1, 10**30]
numbers = st.one_of(st.sampled_from(EDGE_INTS), st.integers(-300, 300), st.floats(allow_nan=True, allow_infinity=True),
                    st.sampled_from([0.0, 0.5, 1.0, 1e-300, 1e30, 1e308]))
anything = st.one_of(numbers, st.none(), st.booleans(), st.text(max_size=6), st.lists(st.integers(0, 5), max_size=3))
maybe_numbers = st.one_of(numbers, numbers, anything)


def _post_json(route: str, body) -> None:
    text = json.dumps(body)  # NaN and Infinity as sloppy JSON encoders write them
    check_reply(started().post(route, content=text, headers={**KEY, "Content-Type": "application/json"}))


@SETTINGS
@given(params=st.dictionaries(st.sampled_from(["max_tokens", "temperature", "top_k", "top_p", "seed", "stop"]),
                              maybe_numbers, max_size=6),
       extra=st.dictionaries(st.sampled_from(["num_samples", "topk_prompt_logprobs", "topk_sample_logprobs",
                                              "prompt_alt_tokens_k", "prompt_logprobs_last_n", "prompt_logprobs"]),
                             maybe_numbers, max_size=3),
       tokens=st.lists(st.one_of(st.integers(0, 140), st.sampled_from(EDGE_INTS)), min_size=1, max_size=6))
def test_sample_requests(params, extra, tokens):
    started()
    body = {"base_model": "tiny", "prompt": {"chunks": [{"type": "encoded_text", "tokens": tokens}]},
            "sampling_params": {"max_tokens": 3, **params}, **extra}
    _post_json("/api/v1/asample", body)


@SETTINGS
@given(adam=st.dictionaries(st.sampled_from(["learning_rate", "beta1", "beta2", "eps", "weight_decay",
                                             "grad_clip_norm"]), maybe_numbers, max_size=4),
       seq_id=st.one_of(st.none(), st.sampled_from(EDGE_INTS), st.text(max_size=3)))
def test_optim_steps(adam, seq_id):
    started()
    # seq_ids of the fuzz run's own order are left alone (a valid one would block the run's later requests)
    if isinstance(seq_id, int) and not isinstance(seq_id, bool) and 0 < seq_id < 2**31:
        seq_id = -seq_id
    _post_json("/api/v1/optim_step", {"model_id": MODEL["model_id"], "seq_id": seq_id, "adam_params": adam})


tensor_json = st.fixed_dictionaries({"data": st.lists(maybe_numbers, max_size=5),
                                     "dtype": st.sampled_from(["int64", "float32", "bf16", 3])},
                                    optional={"shape": st.lists(st.one_of(st.integers(-2, 6), st.sampled_from(EDGE_INTS)),
                                                                max_size=3),
                                              "sparse_crow_indices": st.lists(st.integers(-1, 6), max_size=4),
                                              "sparse_col_indices": st.lists(st.one_of(st.integers(-1, 6),
                                                                                       st.sampled_from(EDGE_INTS)),
                                                                             max_size=4)})


@SETTINGS
@given(tokens=st.lists(st.one_of(st.integers(0, 140), st.sampled_from(EDGE_INTS), st.text(max_size=2)), max_size=5),
       inputs=st.dictionaries(st.sampled_from(["target_tokens", "weights", "advantages", "logprobs"]), tensor_json,
                              max_size=3),
       route=st.sampled_from(["/api/v1/forward", "/api/v1/forward_backward"]),
       loss=st.sampled_from(["cross_entropy", "importance_sampling", "ppo", "nope", 7]))
def test_json_forward_bodies(tokens, inputs, route, loss):
    started()
    body = {"model_id": MODEL["model_id"], "forward_backward_input": {
        "loss_fn": loss, "data": [{"model_input": {"chunks": [{"type": "encoded_text", "tokens": tokens}]},
                                   "loss_fn_inputs": inputs}]}}
    _post_json(route, body)  # no seq_id: arrival order, nothing left waiting


dims = st.one_of(st.integers(0, 6), st.sampled_from([2**20, 2**28, 2**40, 2**62]))


@SETTINGS
@given(tokens=st.lists(st.integers(-3, 140), max_size=5), shape=st.lists(dims, max_size=3),
       sparse=st.booleans(), nnz=st.integers(0, 4), crow=st.lists(st.integers(-2, 6), max_size=5),
       col=st.lists(st.one_of(st.integers(-2, 6), st.sampled_from([2**31, 2**62])), max_size=4),
       dtype=st.sampled_from([pb.DTYPE_INT64, pb.DTYPE_FLOAT32, pb.DTYPE_INT32, 0, 9]),
       zstd=st.booleans(), cut=st.one_of(st.none(), st.integers(1, 40)))
def test_protobuf_forward_backward(tokens, shape, sparse, nnz, crow, col, dtype, zstd, cut):
    started()
    msg = pb.ForwardBackwardRequest(model_id=MODEL["model_id"], loss_fn="cross_entropy")
    datum = msg.data.add()
    datum.model_input.add().encoded_text.tokens = np.asarray(tokens, "<i4").tobytes()
    tensor = datum.loss_fn_inputs["target_tokens"]
    tensor.dtype = dtype
    tensor.shape.extend(shape)
    width = 4 if dtype == pb.DTYPE_FLOAT32 or dtype == pb.DTYPE_INT32 else 8
    if sparse:
        tensor.sparse_csr.values = bytes(width * nnz)
        tensor.sparse_csr.crow_indices = np.asarray(crow, "<i8").tobytes()
        tensor.sparse_csr.col_indices = np.asarray(col, "<i8").tobytes()
    else:
        tensor.dense = bytes(width * nnz)
    body = msg.SerializeToString()
    if zstd:
        body = zstandard.ZstdCompressor().compress(body)
    if cut is not None:
        body = body[:-cut]
    headers = {**KEY, "Content-Type": "application/x-protobuf", **({"Content-Encoding": "zstd"} if zstd else {})}
    check_reply(started().post("/api/v1/forward_backward", content=body, headers=headers))


def test_after_all_that_the_run_trains_and_the_sampler_samples():
    client = started()
    rows = {"target_tokens": [4, 5, 6], "weights": [1.0, 1.0, 1.0]}
    body = {"model_id": MODEL["model_id"], "forward_backward_input": {"loss_fn": "cross_entropy", "data": [
        {"model_input": {"chunks": [{"type": "encoded_text", "tokens": [3, 4, 5]}]},
         "loss_fn_inputs": {k: {"data": v, "dtype": "int64" if k == "target_tokens" else "float32", "shape": [3]}
                            for k, v in rows.items()}}]}}
    fut = client.post("/api/v1/forward_backward", json=body, headers=KEY).json()
    assert "loss:sum" in result(fut["request_id"])["metrics"]
    fut = client.post("/api/v1/asample", headers=KEY, json={
        "base_model": "tiny", "prompt": {"chunks": [{"type": "encoded_text", "tokens": [3, 4]}]},
        "sampling_params": {"max_tokens": 3, "seed": 1, "stop": []}}).json()
    assert len(result(fut["request_id"])["sequences"][0]["tokens"]) == 3
    assert not client.app.state.tinkerd.sampler.has_work()
