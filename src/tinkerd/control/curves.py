"""The curves the console draws, recorded by the server as requests finish: nothing comes from the client.

Each finished forward_backward records its loss function's metrics (`loss:sum` and the rest), the number
of tokens and the loss weight it covered (so `loss_per_token`); each optim_step its learning rate, its
other metrics and how long the engine took; each sample the tokens it produced. Rows go to the Store's
`steps` table (`Store.add_step`), keyed by the run's seq_id, so a replay after a crash records nothing
twice and the curves survive restarts. `run_curves` reads them back as columns for a chart;
`session_rates` turns a session's recent rows into tokens/s.

Called on the engine thread (one Store write per request). Knows the Store and the wire types' shapes;
not HTTP, not torch, not how a chart looks.
"""

from __future__ import annotations

import time

import numpy as np

from tinkerd.protocol.paths import session_of_run
from tinkerd.protocol.types import ForwardBackwardCall, ForwardBackwardResult
from tinkerd.store.db import Store

RATE_WINDOW_SECONDS = 60.0  # session tokens/s: averaged over this window, in buckets of `RATE_BUCKET_SECONDS`
RATE_BUCKET_SECONDS = 5.0


def record_forward_backward(store: Store, owner: str, call: ForwardBackwardCall,
                            result: ForwardBackwardResult) -> None:
    """A forward_backward's metrics; a forward-only pass changes no curve and is not recorded."""
    if call.forward_only:
        return
    tokens = sum(len(d.tokens) for d in call.data)
    weight = sum(float(np.sum(d.loss_inputs["weights"])) for d in call.data if "weights" in d.loss_inputs)
    metrics = {k: float(v) for k, v in result.metrics.items()}
    metrics.update(tokens=tokens, weight=weight, datums=len(call.data))
    if weight > 0 and "loss:sum" in metrics:
        metrics["loss_per_token"] = metrics["loss:sum"] / weight
    store.add_step(owner, session_of_run(call.model_id), call.model_id, call.seq_id or None, "forward_backward",
                   metrics)


def record_optim_step(store: Store, owner: str, model_id: str, seq_id: int | None, learning_rate: float,
                      seconds: float, metrics: dict | None) -> None:
    values = {k: float(v) for k, v in (metrics or {}).items() if isinstance(v, (int, float))}
    values.update(learning_rate=float(learning_rate), seconds=seconds)
    store.add_step(owner, session_of_run(model_id), model_id, seq_id, "optim_step", values)


def record_sample(store: Store, owner: str, session_id: str | None, model_id: str | None, tokens: int,
                  sequences: int, seconds: float) -> None:
    """A finished sample request: of a run's weights (`model_id`) or the base model's (None); `session_id`: the
    client session of its sampling session (None when it named a checkpoint path, which may be another key's)."""
    store.add_step(owner, session_id, model_id, None, "sample",
                   {"tokens": tokens, "sequences": sequences, "seconds": seconds})


def run_curves(store: Store, model_id: str, after: int = 0) -> dict:
    """A run's recorded steps after the cursor `after`, one set of columns per kind:
    {"cursor": N, "series": {kind: {"seq_id": [...], "time": [...], metric: [...]}}}; a metric a row lacks
    is None there. The next poll passes the returned cursor and gets only what is new."""
    rows = store.run_steps(model_id, after)
    by_kind: dict[str, list[dict]] = {}
    for row in rows:
        by_kind.setdefault(row["kind"], []).append(row)
    series = {}
    for kind, these in by_kind.items():
        names = dict.fromkeys(name for row in these for name in row["metrics"])
        columns = {"seq_id": [row["seq_id"] for row in these], "time": [row["created"] for row in these]}
        columns.update({name: [row["metrics"].get(name) for row in these] for name in names})
        series[kind] = columns
    return {"cursor": rows[-1]["cursor"] if rows else after, "series": series}


def session_rates(store: Store, session_id: str, now: float | None = None) -> dict:
    """Train and sample tokens/s of a session's runs and samplers, per bucket over the last minute."""
    now = time.time() if now is None else now
    start = now - RATE_WINDOW_SECONDS
    buckets = int(RATE_WINDOW_SECONDS / RATE_BUCKET_SECONDS)
    train, sample = [0.0] * buckets, [0.0] * buckets
    for row in store.session_steps(session_id, start):
        index = min(buckets - 1, int((row["created"] - start) / RATE_BUCKET_SECONDS))
        if row["kind"] == "forward_backward":
            train[index] += row["metrics"].get("tokens", 0)
        elif row["kind"] == "sample":
            sample[index] += row["metrics"].get("tokens", 0)
    per_second = [round(v / RATE_BUCKET_SECONDS, 2) for v in train], [round(v / RATE_BUCKET_SECONDS, 2) for v in sample]
    return {"bucket_seconds": RATE_BUCKET_SECONDS, "start": start, "train_tokens_per_s": per_second[0],
            "sample_tokens_per_s": per_second[1]}
