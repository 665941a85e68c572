"""Sampling routes: create_sampling_session, samplers/{id}, asample (a future with sequence ids) and
cancel_future. Samples join the scheduler's continuous batch (`control.scheduler.submit_sample`)."""

from __future__ import annotations

import dataclasses
import time

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from tinkerd.control import curves, lifecycle, recovery
from tinkerd.control.checkpoints import sampling_adapter
from tinkerd.control.plane import ControlPlane
from tinkerd.control.scheduler import Outcome
from tinkerd.engine.interface import AdapterRef, SampleTask, snapshot_run
from tinkerd.protocol.paths import parse_tinker_path, sampler_id
from tinkerd.protocol.requests import CreateSamplingSessionRequest, RetrieveFutureRequest, SampleRequest
from tinkerd.protocol.sample import check_counts, encode_sample_pb, prompt_tokens, sample_to_json, sampling_params
from tinkerd.protocol.tensors import Bounds, csr_layout, tensor_from_json
from tinkerd.protocol.types import BadRequest
from tinkerd.server.auth import caller
from tinkerd.server.deps import plane

router = APIRouter(prefix="/api/v1")


def adapter_for(st: ControlPlane, owner: str, model_path: str | None, base_model: str | None, what: str) -> AdapterRef:
    if model_path:
        return sampling_adapter(st, owner, model_path)
    if base_model:
        return AdapterRef(uri=None, base_model=st.base_model(base_model).name)
    raise BadRequest(f"{what} needs sampling_session_id, model_path or base_model")


@router.post("/create_sampling_session")
async def create_sampling_session(body: CreateSamplingSessionRequest, owner: str = Depends(caller),
                                  st: ControlPlane = Depends(plane)):
    st.session(body.session_id, owner)
    ref = adapter_for(st, owner, body.model_path, body.base_model, "create_sampling_session")
    sampling_session = sampler_id(body.session_id, body.sampling_session_seq_id)
    st.store.add_sampling_session(sampling_session, body.session_id, owner, ref.base_model, body.model_path, ref.uri)
    return {"type": "create_sampling_session", "sampling_session_id": sampling_session}


@router.get("/samplers/{sampler_id}")
async def get_sampler(sampler_id: str, owner: str = Depends(caller), st: ControlPlane = Depends(plane)):
    row = st.owned(st.store.sampling_session(sampler_id), owner, "sampler", sampler_id)
    return {"sampler_id": row["id"], "base_model": row["base_model"], "model_path": row["model_path"]}


@router.post("/asample")
async def asample(body: SampleRequest, owner: str = Depends(caller), st: ControlPlane = Depends(plane)):
    if st.scheduler.pending_samples + st.admission.waiting >= st.config.max_pending_samples:
        return JSONResponse({"detail": "sampling queue is full; retry shortly"}, status_code=429)
    if body.sampling_session_id:
        row = st.owned(st.store.sampling_session(body.sampling_session_id), owner, "sampling_session_id",
                       body.sampling_session_id)
        ref = AdapterRef(uri=row["adapter_uri"], base_model=row["base_model"])
        lifecycle.check_snapshot(st, ref.uri)
        session_id, model_path = row["session_id"], row["model_path"]
    else:
        ref = adapter_for(st, owner, body.model_path, body.base_model, "asample")
        session_id, model_path = None, body.model_path
    run = snapshot_run(ref.uri, st.paths.versions) or (parse_tinker_path(model_path)[0] if model_path else None)
    check_counts(body, st.config.max_topk_logprobs)
    tokens, params = prompt_tokens(body.prompt), sampling_params(body.sampling_params)
    targets = target_layout = None
    if body.target_prompt_logprobs is not None:
        bounds = Bounds(rows=len(tokens) - 1, max_cols=st.base_model(ref.base_model).vocab_size or None,
                        max_bytes=st.config.max_decompressed_bytes)
        targets = tensor_from_json(body.target_prompt_logprobs, "target_prompt_logprobs", fill=-1, bounds=bounds)
        if targets.dtype != "int64":
            raise BadRequest("target_prompt_logprobs: expected an int64 tensor of token ids")
        target_layout = csr_layout(body.target_prompt_logprobs)

    future_id = st.board.create(owner, "sample")
    sequence_ids = [f"{future_id}:{i}" for i in range(body.num_samples)]

    submitted = time.perf_counter()

    def encode(result) -> Outcome:  # on the engine thread, when the request finishes
        curves.record_sample(st.store, owner, session_id, run, sum(len(s.tokens) for s in result.sequences),
                             len(result.sequences), time.perf_counter() - submitted)
        if body.record_stability_info:
            for sequence_id, sequence in zip(sequence_ids, result.sequences):
                st.sequences.record(sequence_id, sequence.logprobs)
        return Outcome(json=sample_to_json(result), pb=encode_sample_pb(result, target_layout))

    task = SampleTask(future_id, ref, tokens, body.num_samples, params, bool(body.prompt_logprobs),
                      body.topk_prompt_logprobs, body.prompt_logprobs_last_n, targets, body.prompt_alt_tokens_k,
                      body.topk_sample_logprobs)

    def submit(after_replay: bool) -> None:
        queued = task
        if after_replay and body.sampling_session_id:  # the replay may have rewritten its weights under a new name
            row = st.store.sampling_session(body.sampling_session_id)
            queued = dataclasses.replace(queued, adapter=AdapterRef(row["adapter_uri"], row["base_model"]))
        st.scheduler.submit_sample(queued, encode, session_id)

    cost = body.num_samples * (len(tokens) + params.max_tokens)  # what the per-key limit counts (`admission`)
    recovery.when_recovered(st, ref.uri, lambda after_replay: st.admission.submit(
        owner, future_id, cost, lambda: submit(after_replay), rows=body.num_samples))
    return {"request_id": future_id, "sample_sequence_ids": sequence_ids}


@router.post("/cancel_future")
async def cancel_future(body: RetrieveFutureRequest, owner: str = Depends(caller), st: ControlPlane = Depends(plane)):
    """Abandoned sample polls: the SDK cancels them, and the rows stop decoding at the next step."""
    st.owned(st.store.future(body.request_id), owner, "request_id", body.request_id)
    if st.admission.cancel(body.request_id):  # still waiting for its key's turn
        st.board.fail(body.request_id, "cancelled by the client", "user")
    st.scheduler.cancel_sample(body.request_id)
    return {}
