"""forward_backward on the wire: decode the request (protobuf, zstd or not; JSON for older SDKs),
encode the `ForwardBackwardOutput` result (protobuf, or JSON when the client asks for it)."""

from __future__ import annotations

import numpy as np
from google.protobuf.message import DecodeError

from tinkerd.protocol.tensors import batched_tensor_to_pb, tensor_from_json, tensor_from_pb, tensor_to_pb
from tinkerd.protocol.types import BadRequest, Datum, ForwardBackwardCall, ForwardBackwardResult, ProvenanceSpan
from tinkerd.protocol.wire_pb import pb

MAX_DECOMPRESSED_BYTES = 1 << 31


def decompress_body(body: bytes, content_encoding: str | None) -> bytes:
    if (content_encoding or "").strip().lower() != "zstd":
        return body
    import zstandard

    try:
        return zstandard.ZstdDecompressor().decompress(body, max_output_size=MAX_DECOMPRESSED_BYTES)
    except zstandard.ZstdError as exc:
        raise BadRequest(f"body: invalid zstd data: {exc}") from exc


def _text_tokens(chunks, field: str) -> np.ndarray:
    parts = []
    for j, chunk in enumerate(chunks):
        kind = chunk.WhichOneof("chunk") if hasattr(chunk, "WhichOneof") else None
        if kind != "encoded_text":
            raise BadRequest(f"{field}.chunks[{j}]: only encoded_text chunks are supported by this server, got {kind}")
        raw = chunk.encoded_text.tokens
        if len(raw) % 4:
            raise BadRequest(f"{field}.chunks[{j}].tokens: byte length {len(raw)} is not a multiple of 4")
        parts.append(np.frombuffer(raw, dtype="<i4").astype(np.int64))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def _spans(spans) -> list[ProvenanceSpan]:
    out = []
    for span in spans:
        kind = span.WhichOneof("span")
        if kind is None:
            continue
        arm = getattr(span, kind)
        out.append(ProvenanceSpan("sampled" if kind == "sampled_tokens" else "prompt", arm.sequence_id,
                                  int(arm.offset), int(arm.length)))
    return out


def decode_forward_backward_pb(body: bytes) -> ForwardBackwardCall:
    msg = pb.ForwardBackwardRequest()
    try:
        msg.ParseFromString(body)
    except DecodeError as exc:
        raise BadRequest(f"body: not a valid ForwardBackwardRequest protobuf: {exc}") from exc
    if not msg.model_id:
        raise BadRequest("model_id is required")
    config: dict[str, float | str] = {k: float(v) for k, v in msg.loss_fn_config.items()}
    for key, value in msg.loss_fn_config_v2.items():
        config[key] = value.text if value.WhichOneof("value") == "text" else float(value.number)
    data = []
    for i, datum in enumerate(msg.data):
        tokens = _text_tokens(datum.model_input, f"data[{i}].model_input")
        inputs = {name: tensor_from_pb(t, f"data[{i}].loss_fn_inputs.{name}") for name, t in datum.loss_fn_inputs.items()}
        data.append(Datum(tokens, inputs, _spans(datum.loss_fn_input_spans) if len(datum.loss_fn_input_spans) else None))
    return ForwardBackwardCall(msg.model_id, msg.seq_id, msg.loss_fn or "cross_entropy", config,
                               msg.forward_only, data)


def encode_forward_backward_call_pb(call: ForwardBackwardCall) -> bytes:
    """The inverse of `decode_forward_backward_pb` (the request journal keeps calls in this form)."""
    msg = pb.ForwardBackwardRequest(model_id=call.model_id, seq_id=call.seq_id, loss_fn=call.loss_fn,
                                    forward_only=call.forward_only)
    for key, value in call.loss_config.items():
        if isinstance(value, str):
            msg.loss_fn_config_v2[key].text = value
        else:
            msg.loss_fn_config_v2[key].number = float(value)
    for datum in call.data:
        out = msg.data.add()
        out.model_input.add().encoded_text.tokens = np.asarray(datum.tokens, dtype="<i4").tobytes()
        for name, array in datum.loss_inputs.items():
            tensor_to_pb(np.asarray(array), out.loss_fn_inputs[name])
        for span in datum.target_spans or ():
            arm = out.loss_fn_input_spans.add().sampled_tokens if span.kind == "sampled" else \
                out.loss_fn_input_spans.add().prompt_tokens
            arm.sequence_id, arm.offset, arm.length = span.sequence_id, span.offset, span.length
    return msg.SerializeToString()


def decode_forward_backward_json(obj: dict, forward_only: bool = False) -> ForwardBackwardCall:
    """The pre-0.22.3 JSON body: {model_id, seq_id, forward_backward_input: {data, loss_fn, loss_fn_config}}."""
    if not isinstance(obj, dict) or "model_id" not in obj:
        raise BadRequest("model_id is required")
    fb = obj.get("forward_backward_input") or obj.get("forward_input") or {}
    data = []
    for i, datum in enumerate(fb.get("data") or []):
        tokens = []
        for j, chunk in enumerate(datum.get("model_input", {}).get("chunks", [])):
            if chunk.get("type", "encoded_text") != "encoded_text":
                raise BadRequest(f"data[{i}].model_input.chunks[{j}]: only encoded_text chunks are supported")
            tokens += list(chunk.get("tokens", []))
        inputs = {name: tensor_from_json(t, f"data[{i}].loss_fn_inputs.{name}")
                  for name, t in (datum.get("loss_fn_inputs") or {}).items()}
        data.append(Datum(np.asarray(tokens, dtype=np.int64), inputs))
    return ForwardBackwardCall(str(obj["model_id"]), int(obj.get("seq_id") or 0), fb.get("loss_fn", "cross_entropy"),
                               dict(fb.get("loss_fn_config") or {}), forward_only, data)


def encode_forward_backward_pb(result: ForwardBackwardResult) -> bytes:
    """One ArrayRecord per run of datums whose fields share dtype and trailing shape."""
    msg = pb.ForwardBackwardOutput(loss_fn_output_type="ArrayRecord")
    for key, value in result.metrics.items():
        msg.metrics[key] = float(value)

    def signature(output):
        return tuple(sorted((n, a.dtype.str, a.shape[1:]) for n, a in output.items()))

    start = 0
    outputs = result.outputs
    while start < len(outputs):
        end = start + 1
        while end < len(outputs) and signature(outputs[end]) == signature(outputs[start]):
            end += 1
        record = msg.loss_fn_outputs.add(type_tag="ArrayRecord", num_datums=end - start)
        for name in outputs[start]:
            batched_tensor_to_pb([o[name] for o in outputs[start:end]], record.fields[name])
        start = end
    return msg.SerializeToString()


def forward_backward_to_json(result: ForwardBackwardResult) -> dict:
    return {
        "loss_fn_output_type": "ArrayRecord",
        "loss_fn_outputs": [
            {name: {"data": a.reshape(-1).tolist(), "dtype": "float32" if a.dtype == np.float32 else "int64",
                    "shape": list(a.shape)} for name, a in output.items()}
            for output in result.outputs
        ],
        "metrics": result.metrics,
    }
