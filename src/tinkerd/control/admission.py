"""Per-key admission of sample requests and new training runs, so one tenant cannot starve the others, and
the queue state a waiting request reports.

With `--max-queued-sample-tokens-per-key N`, a key's sample requests enter the sampler only while the
tokens of its requests already in there (num_samples x (prompt + max_tokens) each) stay within N; the
rest wait here in arrival order, and their `retrieve_future` polls answer `try_again` with
`queue_state: paused_rate_limit` and a reason, until the key's earlier requests finish (a request
that alone exceeds N still runs, alone). Nothing is failed for waiting. Off (0) by default. A waiting
request the client cancels is dropped here.

With `--max-runs-per-key N`, a key's request that creates a training run (create_model, or load_weights
into a new run) waits while N of the key's runs created by this process are loaded or parked, until one
of them is released (its session finishes, lapses for good or expires); `paused_rate_limit` again.
Runs rebuilt after a restart are not counted, and a create waiting at a crash is replayed without
the limit.

With `--max-sampler-rows N` (256 by default), sample requests enter the sampler only while the rows
(num_samples each) of all requests in there stay within N: the engine's capacity, which bounds the KV
cache. The rest wait here with `queue_state: paused_capacity` and a reason; as rows free up, waiting
keys take turns (one request per key per round), so a key that queued many does not go first on all
of them. A request larger than N runs once the sampler is empty.

Knows the future board (to hear when requests finish), not the sampler or HTTP.
"""

from __future__ import annotations

from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import Callable

from tinkerd.control.futures import FutureBoard


@dataclass
class _Held:
    future_id: str
    owner: str
    tokens: int
    rows: int
    submit: Callable[[], None]


@dataclass
class Admission:
    board: FutureBoard
    max_tokens_per_key: int = 0  # 0: no per-key limit
    in_sampler: dict[str, int] = field(default_factory=lambda: defaultdict(int))  # owner -> tokens in the sampler
    held: dict[str, deque] = field(default_factory=lambda: defaultdict(deque))  # owner -> waiting requests
    _cost: dict[str, tuple[str, int, int]] = field(default_factory=dict)  # admitted future -> (owner, tokens, rows)
    max_runs_per_key: int = 0  # 0: no limit
    runs: dict[str, set] = field(default_factory=lambda: defaultdict(set))  # owner -> its runs created here
    held_runs: dict[str, deque] = field(default_factory=lambda: defaultdict(deque))  # owner -> waiting creates
    max_rows: int = 0  # rows in the sampler (all keys) before requests wait; 0: no limit
    rows_in_sampler: int = 0

    def submit(self, owner: str, future_id: str, tokens: int, submit: Callable[[], None], rows: int = 1) -> None:
        """Run `submit` now if the key's budget and the sampler's capacity allow it, else once they do."""
        self.held[owner].append(_Held(future_id, owner, tokens, rows, submit))
        self._release()

    def submit_run(self, owner: str, future_id: str, model_id: str, submit: Callable[[], None]) -> None:
        """Create run `model_id` now if the key has fewer than the limit, else once one of its runs is released."""
        self.held_runs[owner].append((future_id, model_id, submit))
        self._release_runs(owner)

    def run_released(self, owner: str, model_id: str) -> None:
        if model_id in self.runs.get(owner, ()):
            self.runs[owner].discard(model_id)
            self._release_runs(owner)

    def _release_runs(self, owner: str) -> None:
        waiting = self.held_runs[owner]
        while waiting and (self.max_runs_per_key <= 0 or len(self.runs[owner]) < self.max_runs_per_key):
            _, model_id, submit = waiting.popleft()
            self.runs[owner].add(model_id)
            submit()

    @property
    def waiting(self) -> int:
        """Requests waiting here (they count against --max-pending-samples like those in the sampler)."""
        return sum(len(w) for w in self.held.values())

    def queue_state(self, future_id: str) -> tuple[str, str | None]:
        """(`queue_state`, reason) for a pending request's `try_again`."""
        for owner, waiting in self.held.items():
            if any(h.future_id == future_id for h in waiting):
                if self._key_allows(waiting[0]):  # its key's queue waits for the sampler, not for the key's budget
                    return "paused_capacity", (
                        f"the sampler is at capacity: {self.rows_in_sampler} rows decoding (limit {self.max_rows}, "
                        f"--max-sampler-rows); this request starts when rows free up")
                return "paused_rate_limit", (
                    f"this API key already has {self.in_sampler[owner]} sample tokens in the sampler (limit "
                    f"{self.max_tokens_per_key}, --max-queued-sample-tokens-per-key); it runs when they finish")
        for owner, waiting in self.held_runs.items():
            if any(future == future_id for future, _, _ in waiting):
                return "paused_rate_limit", (
                    f"concurrent training runs limit: this API key has {len(self.runs[owner])} runs loaded (limit "
                    f"{self.max_runs_per_key}, --max-runs-per-key); it is created when one of them is released")
        return "active", None

    def cancel(self, future_id: str) -> bool:
        """Drop a waiting request (True), or False if it is not waiting here."""
        for waiting in self.held.values():
            for h in waiting:
                if h.future_id == future_id:
                    waiting.remove(h)
                    return True
        return False

    def _key_allows(self, h: _Held) -> bool:
        used = self.in_sampler[h.owner]
        return self.max_tokens_per_key <= 0 or used == 0 or used + h.tokens <= self.max_tokens_per_key

    def _capacity_allows(self, h: _Held) -> bool:
        return self.max_rows <= 0 or self.rows_in_sampler == 0 or self.rows_in_sampler + h.rows <= self.max_rows

    def _release(self) -> None:
        """Admit waiting requests, keys taking turns, while their key's budget and the capacity allow."""
        progressed = True
        while progressed:
            progressed = False
            for owner in [o for o, waiting in self.held.items() if waiting]:
                h = self.held[owner][0]
                if not (self._key_allows(h) and self._capacity_allows(h)):
                    continue
                self.held[owner].popleft()
                self.in_sampler[owner] += h.tokens
                self.rows_in_sampler += h.rows
                self._cost[h.future_id] = (owner, h.tokens, h.rows)
                self.board.when_finished(h.future_id, self._finished)
                h.submit()
                progressed = True

    def _finished(self, future_id: str) -> None:
        owner, tokens, rows = self._cost.pop(future_id, (None, 0, 0))
        if owner is not None:
            self.in_sampler[owner] -= tokens
            self.rows_in_sampler -= rows
            self._release()
