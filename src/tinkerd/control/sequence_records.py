"""What the sampler returned for each sampled sequence, kept so training can use the server's own
sampling logprobs (`stable_reinforce`) instead of trusting the client's copy.

Recorded only for requests with `record_stability_info`; bounded (oldest records go first) and
in memory, so a restart forgets them and training falls back to the client's `logprobs`.
"""

from __future__ import annotations

import collections

import numpy as np

from tinkerd.protocol.types import Datum

MAX_RECORDED_SEQUENCES = 200_000


class SequenceRecords:
    def __init__(self, capacity: int = MAX_RECORDED_SEQUENCES) -> None:
        self.capacity = capacity
        self._logprobs: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()

    def record(self, sequence_id: str, logprobs: list[float]) -> None:
        self._logprobs[sequence_id] = np.asarray(logprobs, dtype=np.float32)
        self._logprobs.move_to_end(sequence_id)
        while len(self._logprobs) > self.capacity:
            self._logprobs.popitem(last=False)

    def sampler_logprobs(self, datum: Datum) -> np.ndarray | None:
        """Per target position: the recorded sampling logprob where a sampled span names a known
        sequence, else the client's `logprobs`. None when no position could be filled."""
        client = datum.loss_inputs.get("logprobs")
        if datum.target_spans is None or client is None or client.ndim != 1:
            return None
        out = client.astype(np.float32).copy()
        position = filled = 0
        for span in datum.target_spans:
            recorded = self._logprobs.get(span.sequence_id) if span.kind == "sampled" else None
            if recorded is not None and span.offset + span.length <= len(recorded) and position + span.length <= len(out):
                out[position:position + span.length] = recorded[span.offset:span.offset + span.length]
                filled += span.length
            position += span.length
        return out if filled else None
