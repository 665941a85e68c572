"""Backend-side ordering checks: per-model seq_id fencing and an epoch, around any `Trainer`.

The front end's scheduler decides the order of each model's operations; a backend only *checks*
it, so a retried, replayed or reordered operation can never be applied twice or out of order,
and a front end that lost its claim (an older process still talking to a detached Ray actor)
cannot change state behind the new one's back:

- **seq_id**: every ordered operation of a model carries its seq_id. One above the last applied
  runs and its outcome (result or error) is cached; a repeat of a cached (seq_id, method) gets the
  cached outcome without running again; anything else at or below the last applied is refused
  (`OutOfOrder`). Gaps are allowed: some ordered requests never reach the engine (answered by the
  Store alone), so the check is "strictly increasing", not "exactly one more".
- **epoch**: the fence's epoch is claimed by whoever drives it (`claim()` returns a new, higher
  one). Every call names the caller's epoch; a stale one is refused (`StaleEpoch`) before
  anything runs.

Operations without a seq_id (creating, dropping, parking and restoring runs; requests of SDKs
that send none) only check the epoch. The seq_id of a `run` job comes from `engine.interface.ordered_op`,
which the scheduler sets around it on the engine thread; forward passes carry theirs in the call.
Torch-free: the embedded engine and the Ray actor wrap the same class around `LocalTrainer`.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from tinkerd.engine.interface import AdapterRef, AdapterSpec, BaseModelInfo, current_op, forward_backward_one
from tinkerd.protocol.types import AdamParams, ForwardBackwardCall, ForwardBackwardResult

RESULTS_KEPT_PER_MODEL = 16


class FenceError(RuntimeError):
    """An operation the backend refused to run: a scheduler or deployment fault, never the client's."""


class StaleEpoch(FenceError):
    pass


class OutOfOrder(FenceError):
    pass


class Restarted(FenceError):
    """The caller's epoch is newer than the fence's: the backend restarted and lost its state."""


@dataclass
class _ModelFence:
    last_applied: int = 0
    outcomes: collections.OrderedDict = field(default_factory=collections.OrderedDict)  # (seq, method) -> outcome


class Fence:
    """The bookkeeping alone: epoch, and per model the last applied seq_id and recent outcomes."""

    def __init__(self, epoch: int = 0, kept: int = RESULTS_KEPT_PER_MODEL) -> None:
        self.epoch = epoch
        self.kept = kept
        self.models: dict[str, _ModelFence] = {}

    def claim(self) -> int:
        self.epoch += 1
        return self.epoch

    def check_epoch(self, epoch: int) -> None:
        if epoch > self.epoch:
            raise Restarted(f"epoch {epoch} is newer than this trainer's ({self.epoch}): it restarted since it "
                            "was claimed, and the training runs it held are gone; the operation was not run")
        if epoch != self.epoch:
            raise StaleEpoch(f"epoch {epoch} is stale: this trainer was claimed by a newer front end (epoch "
                             f"{self.epoch}); the operation was not run")

    def run(self, epoch: int, model_id: str, seq_id: int | None, method: str, fn: Callable[[], Any]) -> Any:
        """Run `fn` as (seq_id, method) of `model_id` once; repeats return (or raise) the first outcome."""
        self.check_epoch(epoch)
        if not seq_id:
            return fn()
        model = self.models.setdefault(model_id, _ModelFence())
        key = (seq_id, method)
        if key in model.outcomes:
            return _replay(model.outcomes[key])
        if seq_id < model.last_applied or (seq_id == model.last_applied and not any(
                s == seq_id for s, _ in model.outcomes)):
            raise OutOfOrder(f"{method} seq_id {seq_id} of model {model_id!r} arrived after seq_id "
                             f"{model.last_applied} was applied, and its outcome is not cached; not run")
        model.last_applied = seq_id
        try:
            outcome = fn()
        except Exception as exc:  # the operation happened (and failed): a retry must see the same failure
            self.keep(model_id, seq_id, method, exc)
            raise
        self.keep(model_id, seq_id, method, outcome)
        return outcome

    def keep(self, model_id: str, seq_id: int, method: str, outcome: Any) -> None:
        model = self.models.setdefault(model_id, _ModelFence())
        model.outcomes[(seq_id, method)] = outcome
        while len(model.outcomes) > self.kept:
            model.outcomes.popitem(last=False)

    def forget(self, model_id: str) -> None:
        self.models.pop(model_id, None)

    def last_applied(self) -> dict[str, int]:
        return {model_id: m.last_applied for model_id, m in self.models.items()}


def _replay(outcome: Any) -> Any:
    if isinstance(outcome, Exception):
        raise outcome
    return outcome


class FencedTrainer:
    """A `Trainer` whose ordered operations go through a `Fence`; every other call is delegated.

    In-process callers use the protocol methods (the caller's epoch is the fence's own, the seq_id
    comes from `ordered_op`); a remote proxy calls `call(epoch, seq, method, *args)` with both.
    """

    def __init__(self, inner, fence: Fence | None = None) -> None:
        self.inner = inner
        self.fence = fence or Fence()

    def call(self, epoch: int, op: tuple[str, int] | None, method: str, *args, **kwargs) -> Any:
        """Run trainer method `method` for ordered operation `op` = (model_id, seq_id) or None."""
        if method == "forward_backward_many":
            self.fence.check_epoch(epoch)
            return self._forward_backward_many(epoch, *args, **kwargs)
        fn = getattr(self.inner, method)
        if method == "drop_adapter":
            self.fence.check_epoch(epoch)
            self.fence.forget(args[0])
            return fn(*args, **kwargs)
        model_id, seq_id = op if op is not None and op[0] == (args[0] if args else None) else (None, None)
        return self.fence.run(epoch, model_id or "", seq_id, method, lambda: fn(*args, **kwargs))

    def _forward_backward_many(self, epoch: int, calls: list[ForwardBackwardCall]) -> list:
        """Fresh calls run together in one batch; repeats get their cached outcome."""
        results: list = [None] * len(calls)
        fresh: list[int] = []
        for i, call in enumerate(calls):
            try:
                results[i] = self.fence.run(epoch, call.model_id, call.seq_id, "forward_backward",
                                            lambda i=i: fresh.append(i) or _PENDING)
            except Exception as exc:  # noqa: BLE001 - a cached failure, or refused: that call's own error
                results[i] = exc
        if fresh:
            for i, outcome in zip(fresh, self.inner.forward_backward_many([calls[i] for i in fresh])):
                results[i] = outcome
                if calls[i].seq_id:
                    self.fence.keep(calls[i].model_id, calls[i].seq_id, "forward_backward", outcome)
        for i, result in enumerate(results):
            if result is _PENDING:  # the same call twice in one batch: the second gets the first's outcome
                results[i] = self.fence.models[calls[i].model_id].outcomes[(calls[i].seq_id, "forward_backward")]
        return results

    def status(self) -> dict:
        return {"epoch": self.fence.epoch, "last_applied": self.fence.last_applied()}

    # the Trainer protocol, in-process

    def _here(self, method: str, *args, **kwargs) -> Any:
        return self.call(self.fence.epoch, current_op(), method, *args, **kwargs)

    def base_models(self) -> list[BaseModelInfo]:
        return self.inner.base_models()

    def create_adapter(self, model_id: str, base_model: str, spec: AdapterSpec) -> None:
        return self._here("create_adapter", model_id, base_model, spec)

    def drop_adapter(self, model_id: str) -> None:
        return self._here("drop_adapter", model_id)

    def forward_backward(self, call: ForwardBackwardCall) -> ForwardBackwardResult:
        return forward_backward_one(self, call)

    def forward_backward_many(self, calls: list[ForwardBackwardCall]) -> list:
        return self._here("forward_backward_many", calls)

    def optim_step(self, model_id: str, params: AdamParams) -> dict[str, float]:
        return self._here("optim_step", model_id, params)

    def snapshot_for_sampler(self, model_id: str) -> AdapterRef:
        return self._here("snapshot_for_sampler", model_id)

    def publish_inflight(self, model_id: str) -> AdapterRef:
        return self._here("publish_inflight", model_id)

    def save_sampler_weights(self, model_id: str, directory: Path) -> None:
        return self._here("save_sampler_weights", model_id, directory)

    def save_state(self, model_id: str, directory: Path, with_gradients: bool = False) -> None:
        return self._here("save_state", model_id, directory, with_gradients)

    def load_state(self, model_id: str, base_model: str | None, directory: Path, with_optimizer: bool) -> AdapterSpec:
        return self._here("load_state", model_id, base_model, directory, with_optimizer)


_PENDING = object()  # placeholder outcome while a fresh forward call waits for its batch
