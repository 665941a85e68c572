import numpy as np
from tinker import types
from tinker.proto.request_conv import forward_backward_request_to_proto

from tinkerd.protocol.forward_backward import decode_forward_backward_pb
from tinkerd.control.sequence_records import SequenceRecords


def _call_with_spans():
    datum = types.Datum(
        model_input=types.ModelInput.from_ints([1, 2, 3, 4, 5]),
        loss_fn_inputs={"target_tokens": types.TensorData.from_numpy(np.array([2, 3, 4, 5, 6])),
                        "logprobs": types.TensorData.from_numpy(np.full(5, -9.0, dtype=np.float32)),
                        "advantages": types.TensorData.from_numpy(np.ones(5, dtype=np.float32))},
        model_input_spans=[types.PromptProvenanceSpan(sequence_id="s:0", offset=0, length=2),
                           types.SampledProvenanceSpan(sequence_id="s:0", offset=0, length=3)],
        loss_fn_input_spans=[types.PromptProvenanceSpan(sequence_id="s:0", offset=1, length=1),
                             types.SampledProvenanceSpan(sequence_id="s:0", offset=0, length=3),
                             types.SampledProvenanceSpan(sequence_id="unknown", offset=0, length=1)],
    )
    req = types.ForwardBackwardRequest(forward_backward_input=types.ForwardBackwardInput(
        data=[datum], loss_fn="stable_reinforce"), model_id="m", seq_id=1)
    return decode_forward_backward_pb(forward_backward_request_to_proto(req).SerializeToString())


def test_recorded_sampling_logprobs_replace_the_clients_on_sampled_spans():
    call = _call_with_spans()
    spans = call.data[0].target_spans
    assert [(s.kind, s.sequence_id, s.offset, s.length) for s in spans] == [
        ("prompt", "s:0", 1, 1), ("sampled", "s:0", 0, 3), ("sampled", "unknown", 0, 1)]
    records = SequenceRecords()
    assert records.sampler_logprobs(call.data[0]) is None  # nothing recorded: the client's values stand
    records.record("s:0", [-0.1, -0.2, -0.3, -0.4])
    np.testing.assert_allclose(records.sampler_logprobs(call.data[0]), [-9.0, -0.1, -0.2, -0.3, -9.0])


def test_records_are_bounded():
    records = SequenceRecords(capacity=2)
    for i in range(3):
        records.record(f"s:{i}", [float(i)])
    assert list(records._logprobs) == ["s:1", "s:2"]
