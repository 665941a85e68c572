"""Two tenants on one server: one sends every bad input of issue 24 while the other trains and samples,
and the other's sampled tokens equal those of an undisturbed run on a fresh server, its losses, gradient
norms and logprobs too (to float rounding: batching with another tenant's rows reorders sums)."""

from __future__ import annotations

import json

import numpy as np
import zstandard
from tinker import types
from tinker.proto.request_conv import forward_backward_request_to_proto

from tests.app_client import app_client, future_result

GOOD = {"X-API-Key": "tml-good-tenant"}
BAD = {"X-API-Key": "tml-bad-tenant"}
PROTOBUF = {"Content-Type": "application/x-protobuf"}


def _open_run(api, headers):
    session = api.post("/api/v1/create_session", json={"tags": []}, headers=headers).json()["session_id"]
    fut = api.post("/api/v1/create_model", headers=headers, json={
        "session_id": session, "model_seq_id": 0, "base_model": "tiny", "lora_config": {"rank": 4, "seed": 3}}).json()
    return future_result(api, fut["request_id"], headers)["model_id"]


def _fb(model_id, seq_id, tokens, weights=None):
    datum = types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                        loss_fn_inputs={"target_tokens": types.TensorData.from_numpy(np.array(tokens[1:])),
                                        "weights": types.TensorData.from_numpy(np.asarray(
                                            weights if weights is not None else [1.0] * (len(tokens) - 1), np.float32))})
    req = types.ForwardBackwardRequest(forward_backward_input=types.ForwardBackwardInput(
        data=[datum], loss_fn="cross_entropy"), model_id=model_id, seq_id=seq_id)
    return forward_backward_request_to_proto(req)


def _sample(api, headers, tokens, **params):
    return api.post("/api/v1/asample", headers=headers, json={
        "base_model": "tiny", "num_samples": params.pop("num_samples", 2),
        "prompt": {"chunks": [{"type": "encoded_text", "tokens": tokens}]},
        "sampling_params": {"max_tokens": 6, "seed": 5, "stop": [], **params}})


BAD_SEQ_IDS = 6  # ordered requests `bad_inputs` sends


def bad_inputs(api, model_id: str, seq_id: int, with_zip_bomb: bool) -> tuple[list[str], list[str]]:
    """Every bad input of issue 24, each answered by a 4xx or a failed future; returns the futures that must
    fail and those that must merely answer. Uses the bad tenant's run's seq_ids from `seq_id` on, one per ordered
    request as the SDK numbers them (a refused request used its seq_id too), through `seq_id + BAD_SEQ_IDS - 1`."""
    seqs = iter(range(seq_id, seq_id + BAD_SEQ_IDS))
    replies = [
        _sample(api, BAD, [3, 4, 5], seed=2**64), _sample(api, BAD, [3, 4, 5], seed=2**64 - 1, num_samples=2),
        api.post("/api/v1/asample", headers={**BAD, "Content-Type": "application/json"}, content=json.dumps({
            "base_model": "tiny", "prompt": {"chunks": [{"type": "encoded_text", "tokens": [3]}]},
            "sampling_params": {"temperature": float("inf"), "top_p": float("nan")}})),
        _sample(api, BAD, [3, 10**6]),  # past the vocabulary: passes the edge, refused by the engine alone
        api.post("/api/v1/asample", headers=BAD, json={"base_model": "tiny", "topk_prompt_logprobs": 10**6,
                                                         "prompt": {"chunks": [{"type": "encoded_text", "tokens": [3, 4]}]}}),
        api.post("/api/v1/forward", headers=BAD, json={"model_id": model_id, "seq_id": "one", "forward_input": {
            "data": [{"model_input": {"chunks": [{"type": "encoded_text", "tokens": ["3", "x"]}]}}]}}),
        api.get(f"/api/v1/training_runs?offset={2**63}", headers=BAD),
        api.get(f"/api/v1/checkpoints?offset={2**64}", headers=BAD),
        api.post("/api/v1/optim_step", headers={**BAD, "Content-Type": "application/json"}, content=json.dumps(
            {"model_id": model_id, "seq_id": next(seqs), "adam_params": {"learning_rate": float("inf")}})),
        api.post("/api/v1/optim_step", headers=BAD, json={"model_id": model_id, "seq_id": next(seqs),
                                                          "adam_params": {"weight_decay": 1e308}}),
    ]
    sparse = _fb(model_id, next(seqs), [3, 4, 5, 6])
    tensor = sparse.data[0].loss_fn_inputs["target_tokens"]
    tensor.ClearField("dense")
    tensor.ClearField("shape")
    tensor.shape.extend([1, 2**28])
    tensor.sparse_csr.values, tensor.sparse_csr.crow_indices = b"\x04" + bytes(7), np.array([0, 1], "<i8").tobytes()
    tensor.sparse_csr.col_indices = bytes(8)
    replies.append(api.post("/api/v1/forward_backward", headers={**BAD, **PROTOBUF}, content=sparse.SerializeToString()))
    if with_zip_bomb:
        huge = _fb(model_id, next(seqs), [3, 4])
        huge.data[0].model_input[0].encoded_text.tokens = b"\x03\x00\x00\x00" * ((64 << 20) // 4 + 1024)  # past the 64 MiB cap
        replies.append(api.post("/api/v1/forward_backward", headers={**BAD, **PROTOBUF, "Content-Encoding": "zstd"},
                                content=zstandard.ZstdCompressor().compress(huge.SerializeToString())))
    # A step that passes the edge but overflows the loss, then is refused by the engine: the bad run keeps going.
    fut = api.post("/api/v1/forward_backward", headers={**BAD, **PROTOBUF},
                   content=_fb(model_id, next(seqs), [3, 4, 5], weights=[3e38, 3e38]).SerializeToString()).json()
    step = api.post("/api/v1/optim_step", headers=BAD, json={"model_id": model_id, "seq_id": next(seqs),
                                                              "adam_params": {"learning_rate": 1.0}}).json()
    for reply in replies[:3] + replies[4:]:
        assert 400 <= reply.status_code < 500, (reply.status_code, reply.text)
        assert reply.json()["detail"]
    assert replies[3].status_code == 200  # the out-of-vocabulary prompt: its future fails
    engine_refused = [step["request_id"]] + [r.json()["request_id"] for r in replies if r.status_code == 200]
    return engine_refused, [fut["request_id"]]


def good_tenant(api, disturb=None) -> list:
    """Two steps of training then sampling; `disturb(step)` runs the other tenant's inputs in between."""
    model_id = _open_run(api, GOOD)
    out = []
    for step in range(2):
        if disturb:
            disturb(step)
        fb = api.post("/api/v1/forward_backward", headers={**GOOD, **PROTOBUF},
                      content=_fb(model_id, 2 * step + 1, [3, 9, 4, 17, 5, 6]).SerializeToString()).json()
        opt = api.post("/api/v1/optim_step", headers=GOOD, json={"model_id": model_id, "seq_id": 2 * step + 2,
                                                                 "adam_params": {"learning_rate": 0.05}}).json()
        sample = _sample(api, GOOD, [3, 4, 5]).json()
        out.append(future_result(api, fb["request_id"], GOOD)["metrics"]["loss:sum"])
        out.append(future_result(api, opt["request_id"], GOOD)["metrics"]["grad_norm:mean"])
        out.append([(s["tokens"], s["logprobs"]) for s in future_result(api, sample["request_id"], GOOD)["sequences"]])
    fut = api.post("/api/v1/save_weights_for_sampler", headers=GOOD,
                   json={"model_id": model_id, "seq_id": 5, "sampling_session_seq_id": 1}).json()
    sampler = future_result(api, fut["request_id"], GOOD)["sampling_session_id"]
    tuned = api.post("/api/v1/asample", headers=GOOD, json={
        "sampling_session_id": sampler, "num_samples": 2, "prompt": {"chunks": [{"type": "encoded_text", "tokens": [3]}]},
        "sampling_params": {"max_tokens": 6, "seed": 9, "stop": []}}).json()
    out.append(future_result(api, tuned["request_id"], GOOD)["sequences"])
    return out


def test_one_tenants_bad_inputs_leave_the_others_results_unchanged(tmp_path):
    undisturbed = next(gen := app_client(tmp_path / "alone"))
    alone = good_tenant(undisturbed)
    gen.close()

    api = next(gen := app_client(tmp_path / "shared"))
    bad_run = _open_run(api, BAD)
    refused, answered = [], []

    def disturb(step: int) -> None:
        must_fail, must_answer = bad_inputs(api, bad_run, BAD_SEQ_IDS * step + 1, with_zip_bomb=True)
        refused.extend(must_fail)
        answered.extend(must_answer)

    disturbed = good_tenant(api, disturb)
    for request_id in refused:
        assert future_result(api, request_id, BAD)["category"] == "user"  # each failed alone, as a future
    for request_id in answered:
        assert api.post("/api/v1/retrieve_future", headers=BAD, json={"request_id": request_id}).status_code == 200
    gen.close()
    assert _tokens(disturbed) == _tokens(alone)
    # Rows of the bad tenant that pass the edge share the good tenant's batches, which moves sums in the last bits.
    np.testing.assert_allclose(_numbers(disturbed), _numbers(alone), rtol=1e-5)


def _tokens(results) -> list:
    return [[s[0] if isinstance(s, tuple) else s["tokens"] for s in r] for r in results if isinstance(r, list)]


def _numbers(results) -> list[float]:
    out = []
    for r in results:
        if isinstance(r, list):
            out += [x for s in r for x in (s[1] if isinstance(s, tuple) else s["logprobs"])]
        else:
            out.append(r)
    return out
