"""forward_backward on the wire: decode the request (protobuf, zstd or not; JSON for older SDKs),
encode the `ForwardBackwardOutput` result (protobuf, or JSON when the client asks for it)."""

from __future__ import annotations

import json

import numpy as np
from google.protobuf.message import DecodeError

from tinkerd.protocol.numbers import INT32_MAX, INT64_MAX, as_float, as_int, int_list
from tinkerd.protocol.tensors import (DEFAULT_MAX_TENSOR_BYTES, Bounds, batched_tensor_to_pb, tensor_from_json,
                                      tensor_from_pb, tensor_to_pb)
from tinkerd.protocol.types import BadRequest, Datum, ForwardBackwardCall, ForwardBackwardResult, ProvenanceSpan
from tinkerd.protocol.wire_pb import pb

class UndecompressibleBody(BadRequest):
    """A compressed body refused while decompressing; `prefix`: its first decompressed bytes (they may still
    say which run and seq_id the request was, `request_order`)."""

    def __init__(self, message: str, prefix: bytes) -> None:
        super().__init__(message)
        self.prefix = prefix


def decompress_body(body: bytes, content_encoding: str | None,
                    max_bytes: int = DEFAULT_MAX_TENSOR_BYTES) -> bytes:
    """The body, zstd-decompressed if so encoded, refused (`UndecompressibleBody`) as soon as the output passes
    `max_bytes` (the server's `--max-decompressed-bytes`): decompressed in pieces, never allocated whole."""
    if (content_encoding or "").strip().lower() != "zstd":
        return body
    import zstandard

    out, size = [], 0
    try:
        reader = zstandard.ZstdDecompressor().stream_reader(body, read_across_frames=True)
        while piece := reader.read(1 << 20):
            size += len(piece)
            if size > max_bytes:
                raise UndecompressibleBody(f"body: decompressed size exceeds the server's limit of {max_bytes} "
                                           "bytes (--max-decompressed-bytes)", out[0][:4096] if out else piece[:4096])
            out.append(piece)
    except zstandard.ZstdError as exc:
        raise UndecompressibleBody(f"body: invalid zstd data: {exc}", out[0][:4096] if out else b"") from exc
    return b"".join(out)


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


def decode_forward_backward_pb(body: bytes, max_width: int | None = None,
                               max_tensor_bytes: int = DEFAULT_MAX_TENSOR_BYTES) -> ForwardBackwardCall:
    """`max_width`: the widest a loss input may be (the vocabulary); `max_tensor_bytes`: the most one may take
    once dense. Both are checked, with each tensor's rows against its datum's tokens, before allocating."""
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
        bounds = Bounds(rows=len(tokens), max_cols=max_width, max_bytes=max_tensor_bytes)
        inputs = {name: tensor_from_pb(t, f"data[{i}].loss_fn_inputs.{name}", bounds)
                  for name, t in datum.loss_fn_inputs.items()}
        data.append(Datum(tokens, inputs, _spans(datum.loss_fn_input_spans) if len(datum.loss_fn_input_spans) else None))
    return ForwardBackwardCall(msg.model_id, msg.seq_id, msg.loss_fn or "cross_entropy", config,
                               msg.forward_only, data)


def request_order(body: bytes, as_json: bool) -> tuple[str, int] | None:
    """(model_id, seq_id) of a forward pass whose body could not be decoded as a whole, when those two can be
    read; None otherwise. A refused request still used its seq_id (`control.ops.hold_refused_place`)."""
    if as_json:
        try:
            obj = json.loads(body)
        except ValueError:
            return None
        model_id, seq_id = (obj.get("model_id"), obj.get("seq_id")) if isinstance(obj, dict) else (None, None)
    else:
        model_id, seq_id = _leading_order_fields(body)
    if not isinstance(model_id, str) or not model_id or type(seq_id) is not int or seq_id <= 0:
        return None
    return model_id, seq_id


def _leading_order_fields(body: bytes) -> tuple[str | None, int | None]:
    """model_id (field 1) and seq_id (field 2) of a ForwardBackwardRequest, read from the start of its bytes, where
    a serializer writes them (fields in number order): a truncated or otherwise broken body still gives them."""
    model_id = seq_id = None
    position = 0
    while position < len(body):
        tag, position = _varint(body, position)
        if tag is None or tag >> 3 not in (1, 2):
            break
        if tag == (1 << 3) | 2:  # model_id: length-delimited
            length, position = _varint(body, position)
            if length is None or position + length > len(body):
                break
            try:
                model_id = body[position:position + length].decode()
            except UnicodeDecodeError:
                break
            position += length
        elif tag == (2 << 3) | 0:  # seq_id: varint
            seq_id, position = _varint(body, position)
        else:
            break
    return model_id, seq_id


def _varint(data: bytes, position: int) -> tuple[int | None, int]:
    value = shift = 0
    while position < len(data) and shift < 64:
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, position
        shift += 7
    return None, position


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


def decode_forward_backward_json(obj: dict, forward_only: bool = False, max_width: int | None = None,
                                 max_tensor_bytes: int = DEFAULT_MAX_TENSOR_BYTES) -> ForwardBackwardCall:
    """The pre-0.22.3 JSON body: {model_id, seq_id, forward_backward_input: {data, loss_fn, loss_fn_config}}.
    Every field is type- and range-checked here; a wrong one is a `BadRequest` naming it."""
    if not isinstance(obj, dict) or "model_id" not in obj:
        raise BadRequest("model_id is required")
    if not isinstance(obj["model_id"], str):
        raise BadRequest("model_id: expected a string")
    seq_id = 0 if obj.get("seq_id") is None else as_int(obj["seq_id"], "seq_id", 0, INT64_MAX)
    fb = obj.get("forward_backward_input") or obj.get("forward_input") or {}
    if not isinstance(fb, dict):
        raise BadRequest("forward_backward_input: expected an object")
    loss_fn = fb.get("loss_fn", "cross_entropy")
    if not isinstance(loss_fn, str):
        raise BadRequest("forward_backward_input.loss_fn: expected a string")
    config = fb.get("loss_fn_config") or {}
    if not isinstance(config, dict):
        raise BadRequest("forward_backward_input.loss_fn_config: expected an object")
    config = {k: v if isinstance(v, str) else as_float(v, f"loss_fn_config.{k}") for k, v in config.items()}
    raw_data = fb.get("data") or []
    if not isinstance(raw_data, list):
        raise BadRequest("forward_backward_input.data: expected a list of datums")
    data = []
    for i, datum in enumerate(raw_data):
        if not isinstance(datum, dict):
            raise BadRequest(f"data[{i}]: expected an object")
        chunks = (datum.get("model_input") or {}).get("chunks", []) if isinstance(datum.get("model_input"), dict) else None
        if not isinstance(chunks, list):
            raise BadRequest(f"data[{i}].model_input: expected a ModelInput object with a 'chunks' list")
        tokens: list[int] = []
        for j, chunk in enumerate(chunks):
            if not isinstance(chunk, dict) or chunk.get("type", "encoded_text") != "encoded_text":
                raise BadRequest(f"data[{i}].model_input.chunks[{j}]: only encoded_text chunks are supported")
            tokens += int_list(chunk.get("tokens", []), f"data[{i}].model_input.chunks[{j}].tokens", 0, INT32_MAX)
        inputs = datum.get("loss_fn_inputs") or {}
        if not isinstance(inputs, dict):
            raise BadRequest(f"data[{i}].loss_fn_inputs: expected an object")
        bounds = Bounds(rows=len(tokens), max_cols=max_width, max_bytes=max_tensor_bytes)
        data.append(Datum(np.asarray(tokens, dtype=np.int64),
                          {name: tensor_from_json(t, f"data[{i}].loss_fn_inputs.{name}", bounds=bounds)
                           for name, t in inputs.items()}))
    return ForwardBackwardCall(obj["model_id"], seq_id, loss_fn, config, forward_only, data)


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
