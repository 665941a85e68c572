"""Round trips through the SDK's own types and converters (the SDK is the reference codec)."""

import math

import numpy as np
import pytest
import torch
import zstandard
from tinker import types
from tinker.proto.request_conv import forward_backward_request_to_proto
from tinker.proto.response_conv import deserialize_forward_backward_output, deserialize_sample_response

from tinkerd.protocol.forward_backward import (
    decode_forward_backward_pb,
    decompress_body,
    encode_forward_backward_call_pb,
    encode_forward_backward_pb,
)
from tinkerd.protocol.sample import encode_sample_pb, prompt_tokens, sampling_params
from tinkerd.protocol.types import BadRequest, ForwardBackwardResult, ProvenanceSpan, SampledSequence, SampleResult


def _sdk_request():
    soft_targets = torch.zeros(4, 6, dtype=torch.int64)
    soft_targets[:, 0] = torch.tensor([11, 12, 13, 14])
    soft_weights = torch.zeros(4, 6)
    soft_weights[:, 0] = 1.0
    data = [
        types.Datum(
            model_input=types.ModelInput.from_ints([1, 2, 3]),
            loss_fn_inputs={"target_tokens": types.TensorData.from_numpy(np.array([2, 3, 4])),
                            "weights": types.TensorData.from_numpy(np.array([0.5, -1.0, 2.0], dtype=np.float32))},
        ),
        types.Datum(
            model_input=types.ModelInput(chunks=[types.EncodedTextChunk(tokens=[5, 6]),
                                                 types.EncodedTextChunk(tokens=[7, 8])]),
            loss_fn_inputs={"target_tokens": types.TensorData.from_torch_sparse(soft_targets),
                            "weights": types.TensorData.from_torch_sparse(soft_weights)},
        ),
    ]
    fb_input = types.ForwardBackwardInput(data=data, loss_fn="ppo", loss_fn_config={"clip_low_threshold": 0.7})
    return types.ForwardBackwardRequest(forward_backward_input=fb_input, model_id="s:train:0", seq_id=3), soft_targets


def test_forward_backward_request_decodes_like_the_sdk_encoded_it():
    request, soft_targets = _sdk_request()
    msg = forward_backward_request_to_proto(request)
    assert msg.data[1].loss_fn_inputs["target_tokens"].HasField("sparse_csr")  # the CSR path is exercised
    body = zstandard.ZstdCompressor().compress(msg.SerializeToString())
    call = decode_forward_backward_pb(decompress_body(body, "zstd"))
    assert (call.model_id, call.seq_id, call.loss_fn, call.forward_only) == ("s:train:0", 3, "ppo", False)
    assert call.loss_config == {"clip_low_threshold": pytest.approx(0.7)}
    assert call.data[0].tokens.tolist() == [1, 2, 3]
    assert call.data[0].loss_inputs["weights"].tolist() == [0.5, -1.0, 2.0]
    assert call.data[1].tokens.tolist() == [5, 6, 7, 8]
    np.testing.assert_array_equal(call.data[1].loss_inputs["target_tokens"], soft_targets.numpy())


def test_a_decoded_call_encodes_back_to_an_equal_call():
    call = decode_forward_backward_pb(forward_backward_request_to_proto(_sdk_request()[0]).SerializeToString())
    call.loss_config["mode"] = "token"  # a text config value, as loss_fn_config_v2 carries it
    call.data[0].loss_inputs["sampler_logprobs"] = np.array([-0.5, -1.25, -2.0], dtype=np.float32)
    call.data[0].target_spans = [ProvenanceSpan("prompt", "r:0", 1, 1), ProvenanceSpan("sampled", "r:0", 0, 2)]
    again = decode_forward_backward_pb(encode_forward_backward_call_pb(call))
    assert (again.model_id, again.seq_id, again.loss_fn, again.forward_only) == ("s:train:0", 3, "ppo", False)
    assert again.loss_config == call.loss_config
    assert again.data[0].target_spans == call.data[0].target_spans and again.data[1].target_spans is None
    for mine, theirs in zip(call.data, again.data):
        np.testing.assert_array_equal(mine.tokens, theirs.tokens)
        assert mine.loss_inputs.keys() == theirs.loss_inputs.keys()
        for name, array in mine.loss_inputs.items():
            assert theirs.loss_inputs[name].dtype == array.dtype
            np.testing.assert_array_equal(theirs.loss_inputs[name], array)


def test_garbage_body_is_a_bad_request():
    with pytest.raises(BadRequest, match="ForwardBackwardRequest"):
        decode_forward_backward_pb(b"\xff\xff\xff\xff")


def test_forward_backward_output_reads_back_through_the_sdk():
    outputs = [{"logprobs": np.array([-1.0, -2.0, -0.5], dtype=np.float32)},
               {"logprobs": np.array([-3.0], dtype=np.float32)},
               {"logprobs": np.arange(6, dtype=np.float32).reshape(3, 2)}]
    result = ForwardBackwardResult(outputs, {"loss:sum": 4.5})
    sdk = deserialize_forward_backward_output(encode_forward_backward_pb(result))
    assert sdk.metrics == {"loss:sum": 4.5}
    assert [o["logprobs"].shape for o in sdk.loss_fn_outputs] == [[3], [1], [3, 2]]
    for ours, theirs in zip(outputs, sdk.loss_fn_outputs):
        np.testing.assert_array_equal(theirs["logprobs"].to_numpy(), ours["logprobs"])


def test_sample_response_reads_back_through_the_sdk():
    result = SampleResult([SampledSequence([5, 6, 2], [-0.1, -0.2, -0.3], "stop"),
                           SampledSequence([7], [-1.5], "length")], prompt_logprobs=[math.nan, -1.25])
    sdk = deserialize_sample_response(encode_sample_pb(result))
    assert [s.tokens for s in sdk.sequences] == [[5, 6, 2], [7]]
    assert [s.stop_reason for s in sdk.sequences] == ["stop", "length"]
    assert sdk.sequences[0].logprobs == pytest.approx([-0.1, -0.2, -0.3])
    assert sdk.prompt_logprobs[0] is None and sdk.prompt_logprobs[1] == pytest.approx(-1.25)


def test_sampling_request_fields():
    assert prompt_tokens({"chunks": [{"type": "encoded_text", "tokens": [1, 2]}, {"tokens": [3]}]}) == [1, 2, 3]
    assert sampling_params({"stop": []}).stop_at_eos is False
    assert sampling_params({"stop": "\n\nUser:"}).stop_strings == ("\n\nUser:",)
    assert sampling_params({"stop": [2, 7]}).stop_tokens == (2, 7)
    with pytest.raises(BadRequest, match="sampling_params.stop"):
        sampling_params({"stop": [1, "x"]})
    with pytest.raises(BadRequest, match=r"prompt.chunks\[0\]"):
        prompt_tokens({"chunks": [{"type": "image", "data": ""}]})
