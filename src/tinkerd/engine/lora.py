"""Multi-adapter LoRA on a frozen base model.

Every target `nn.Linear` is wrapped in a `LoRALinear` that holds any number of adapters, each
with its own rank. An `AdapterRouter`, shared by all wrappers of one model, says which adapter
each batch row uses for the current pass, so one forward can serve several tenants (rows with
no adapter see the plain base model). Adapter weights are fp32 masters; they are cast to the
activation dtype (bf16 on CPU) inside the forward, and gradients flow back to the fp32 copies.
Passes without autograd (sampling, forward-only) reuse compute-dtype copies until the weights'
version counters change, and run a pass through several adapters as two batched GEMMs over the
adapters stacked per wrapper (`AdapterStack`, about the stacked adapters' size again in memory).

`LoRAAdapters` creates, seeds, exports, loads and removes adapters. Removal respects pins: an
adapter in use by running samples is removed when its last pin is released. Read-only adapters
loaded from files (`load(..., trainable=False)`, e.g. the sampler's checkpoint folders) form a
cache that is evicted least-recently-used beyond `cache_max_adapters` / `cache_max_bytes`;
eviction never touches a pinned adapter, nor one loaded in the last `CACHE_GRACE_SECONDS` that
nobody has pinned yet (loaded for a request that is about to pin it). Knows nothing of
optimizers, losses, sessions or files.
"""

from __future__ import annotations

import contextlib
import math
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from torch import nn

from tinkerd.engine.interface import AdapterSpec
from tinkerd.engine.kernels.memory import release_freed_memory

ATTN, MLP, UNEMBED = "attn", "mlp", "unembed"
CACHE_MAX_ADAPTERS = 16  # read-only adapters loaded from files kept in memory (least recently used go first)
CACHE_MAX_BYTES = 1 << 30  # ... and at most this many bytes of them
CACHE_GRACE_SECONDS = 60.0  # a freshly loaded adapter nobody pinned yet is safe from eviction this long
STACK_MIN_ADAPTERS = 2  # passes without autograd through at least this many adapters run them as one stacked bmm
STACK_IDLE_FACTOR = 2  # a stack is rebuilt once it holds more than this many slots per adapter a pass uses


class AdapterRouter:
    """Per-pass routing: a list of (adapter key, its rows: None for every row, a slice when they are
    contiguous, else an index tensor)."""

    def __init__(self) -> None:
        self.groups: list[tuple[str, torch.Tensor | slice | None]] = []
        self._gathers: dict[tuple[str, ...], RowGather] = {}  # this route's, per order of stacked adapters

    @contextlib.contextmanager
    def route(self, keys_per_row: list[str | None]):
        """Route batch row i through adapter `keys_per_row[i]` (None = base model) inside the block."""
        distinct = list(dict.fromkeys(keys_per_row))
        if len(distinct) == 1:
            groups = [] if distinct[0] is None else [(distinct[0], None)]
        else:
            groups = [(key, _rows_of(keys_per_row, key)) for key in distinct if key is not None]
        previous, self.groups = (self.groups, self._gathers), groups
        self._gathers = {}
        try:
            yield
        finally:
            self.groups, self._gathers = previous

    def gather(self, slots: tuple[str, ...], device: torch.device) -> "RowGather":
        """This route's rows laid out for adapters stacked in the order `slots`, computed once per route and
        order (the wrappers of one model mostly stack the same adapters in the same order)."""
        gather = self._gathers.get(slots)
        if gather is None:
            gather = self._gathers[slots] = RowGather.of(self.groups, slots, device)
        return gather


@dataclass
class RowGather:
    """Batch rows grouped by stacked adapter: `index` (slots, m) holds each slot's rows, padded with row 0;
    `real` the flat positions of `index` that are real rows (None: no padding), `rows` their row numbers."""

    index: torch.Tensor
    real: torch.Tensor | None
    rows: torch.Tensor

    @classmethod
    def of(cls, groups: list[tuple[str, torch.Tensor | slice | None]], slots: tuple[str, ...],
           device: torch.device) -> "RowGather":
        rows_of = {key: (list(range(r.start, r.stop)) if isinstance(r, slice) else r.tolist()) for key, r in groups}
        per_slot = [rows_of.get(key, []) for key in slots]
        m = max(len(rows) for rows in per_slot)
        index = torch.tensor([rows + [0] * (m - len(rows)) for rows in per_slot], dtype=torch.long, device=device)
        if all(len(rows) == m for rows in per_slot):
            return cls(index, None, index.flatten())
        real = torch.tensor([slot * m + i for slot, rows in enumerate(per_slot) for i in range(len(rows))],
                            device=device)
        return cls(index, real, index.flatten()[real])


def _rows_of(keys_per_row: list[str | None], key: str) -> torch.Tensor | slice:
    rows = [i for i, k in enumerate(keys_per_row) if k == key]
    if rows[-1] - rows[0] + 1 == len(rows):
        return slice(rows[0], rows[-1] + 1)
    return torch.tensor(rows)


def same_version(a: tuple | None, b: tuple) -> bool:
    """Whether two `LoRAWeights.version()`s name the same values (the tensors by identity, never by value)."""
    return a is not None and a[0] is b[0] and a[1] == b[1] and a[2] is b[2] and a[3] == b[3]


@dataclass
class LoRAWeights:
    A: torch.Tensor  # (in, r) fp32
    B: torch.Tensor  # (r, out) fp32
    scale: float
    # (scale * A, B) in a compute dtype, for passes without autograd, keyed by (A, B, their version counters,
    # dtype): any in-place change (an optimizer step, a copy into them) bumps a counter, a new tensor is another
    # object. The read-only cache's byte bound counts A and B, not this copy (about their size again).
    _compute: tuple | None = field(default=None, init=False, repr=False, compare=False)

    def version(self) -> tuple:
        """What identifies these values: the tensors and their version counters (compare with `same_version`)."""
        return (self.A, self.A._version, self.B, self.B._version)

    def compute_pair(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale * A, B) in `dtype`, computed once per version (no autograd: only for passes without gradients)."""
        cached = self._compute
        if cached is None or cached[0] != dtype or not same_version(cached[1], self.version()):
            with torch.no_grad():
                pair = ((self.A * self.scale).to(dtype), self.B.to(dtype))
            self._compute = cached = (dtype, self.version(), pair)
        return cached[2]

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """scale * (x A) B in x's dtype; the gradient reaches the fp32 masters through the casts."""
        return ((x @ self.A.to(x.dtype)) * self.scale) @ self.B.to(x.dtype)

    def add_to(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """y + scale * (x A) B as one GEMM accumulating into y (no separate add over y, and the scale is
        applied to the small A instead of the activations): ~30 % less LoRA time forward + backward."""
        lead, rows_x, rows_y = y.shape[:-1], x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
        if torch.is_grad_enabled():
            xa = rows_x @ (self.A * self.scale).to(x.dtype)
            return torch.addmm(rows_y, xa, self.B.to(x.dtype)).view(*lead, y.shape[-1])
        # no autograd (sampling, forward-only passes): scale * A and B in x's dtype are reused, the product
        # accumulates into y
        A, B = self.compute_pair(x.dtype)
        return rows_y.addmm_(rows_x @ A, B).view(*lead, y.shape[-1])


class LoRALinear(nn.Module):
    """A frozen linear plus a routed sum of low-rank deltas: y = xW^T + scale * (x A) B."""

    def __init__(self, base: nn.Linear, router: AdapterRouter, kind: str) -> None:
        super().__init__()
        self.base = base
        self.router = router
        self.kind = kind
        self.adapters: dict[str, LoRAWeights] = {}  # not registered: never part of the base's parameters
        self.stacked: AdapterStack | None = None  # the adapters of passes without autograd, stacked for one bmm

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        routed = [(key, rows) for key, rows in self.router.groups if key in self.adapters]
        if len(routed) >= STACK_MIN_ADAPTERS and not torch.is_grad_enabled():
            return self._stacked_deltas(y, x, [key for key, _ in routed])
        groups = [(self.adapters[key], rows) for key, rows in routed]
        if groups and all(isinstance(rows, slice) for _, rows in groups):
            return self._sliced_deltas(y, x, groups)
        for w, rows in groups:
            # Scale the rank-r intermediate, and add in place (the base linear's backward needs not its output).
            if rows is None:
                y = w.add_to(y, x)
            else:  # interleaved rows: some adapters' rows may still be contiguous (a slice)
                index = torch.arange(rows.start, rows.stop) if isinstance(rows, slice) else rows
                y.index_add_(0, index, w.delta(x.index_select(0, index)).to(y.dtype))
        return y

    def _stacked_deltas(self, y: torch.Tensor, x: torch.Tensor, keys: list[str]) -> torch.Tensor:
        """Every adapter's rows at once, without autograd: the rows grouped by adapter (padded to the biggest
        group) go through two batched GEMMs over the stacked adapters and are added back into their rows of y."""
        stack = self.stacked
        if stack is None or not stack.serves(self.adapters, keys, x.dtype):
            stack = self.stacked = AdapterStack.of(self.adapters, keys, x.dtype)
        gather = self.router.gather(stack.keys, x.device)
        slots, m = gather.index.shape
        lead = x.shape[1:-1]
        xg = x.index_select(0, gather.index.flatten()).reshape(slots, -1, x.shape[-1])
        delta = torch.bmm(torch.bmm(xg, stack.A), stack.B).view(slots * m, *lead, y.shape[-1])
        if gather.real is not None:
            delta = delta.index_select(0, gather.real)
        return y.index_add_(0, gather.rows, delta)

    def _sliced_deltas(self, y: torch.Tensor, x: torch.Tensor, groups: list[tuple["LoRAWeights", slice]]) -> torch.Tensor:
        """Each adapter on its own contiguous rows, rows of no adapter unchanged. One split and one
        concatenation: their backward passes are one concatenation and one split (indexing each
        slice separately would accumulate a full-size gradient of x per adapter)."""
        sizes, owners, at = [], [], 0
        for w, rows in sorted(groups, key=lambda g: g[1].start):
            if rows.start > at:
                sizes.append(rows.start - at)
                owners.append(None)
            sizes.append(rows.stop - rows.start)
            owners.append(w)
            at = rows.stop
        if at < x.shape[0]:
            sizes.append(x.shape[0] - at)
            owners.append(None)
        return torch.cat([ys if w is None else w.add_to(ys, xs)
                          for w, xs, ys in zip(owners, x.split(sizes), y.split(sizes))])


@dataclass
class AdapterStack:
    """Some adapters of one wrapper, stacked in a compute dtype: `A` (slots, in, r) holding scale * A, `B`
    (slots, r, out), smaller ranks zero-padded to the biggest. Kept while the adapters a pass routes to are a
    subset of its slots (rows that finish leave their slot idle) and none of them changed; a changed adapter is
    copied into its slot again."""

    keys: tuple[str, ...]
    dtype: torch.dtype
    A: torch.Tensor
    B: torch.Tensor
    versions: list[tuple]

    @classmethod
    def of(cls, adapters: dict[str, LoRAWeights], keys: list[str], dtype: torch.dtype) -> "AdapterStack":
        keys = tuple(sorted(keys))
        ws = [adapters[k] for k in keys]
        rank = max(w.A.shape[1] for w in ws)
        device = ws[0].A.device
        A = torch.zeros(len(ws), ws[0].A.shape[0], rank, dtype=dtype, device=device)
        B = torch.zeros(len(ws), rank, ws[0].B.shape[1], dtype=dtype, device=device)
        stack = cls(keys, dtype, A, B, [None] * len(ws))
        for slot, w in enumerate(ws):
            stack.refresh(slot, w)
        return stack

    def refresh(self, slot: int, w: LoRAWeights) -> None:
        r = w.A.shape[1]
        with torch.no_grad():
            self.A[slot, :, :r].copy_(w.A * w.scale)
            self.B[slot, :r].copy_(w.B)
            self.A[slot, :, r:].zero_()  # a slot whose adapter came back with a smaller rank
            self.B[slot, r:].zero_()
        self.versions[slot] = w.version()

    def serves(self, adapters: dict[str, LoRAWeights], keys: list[str], dtype: torch.dtype) -> bool:
        """Whether this stack can serve a pass routed to `keys` (refreshing the slots of changed adapters)."""
        if dtype != self.dtype or len(self.keys) > STACK_IDLE_FACTOR * len(keys) or not set(keys) <= set(self.keys):
            return False
        for slot, key in enumerate(self.keys):
            w = adapters.get(key)
            if w is not None and not same_version(self.versions[slot], w.version()):
                if w.A.shape[1] > self.A.shape[2]:
                    return False
                self.refresh(slot, w)
        return True


def classify_linear(name: str) -> str | None:
    """Which LoRA target family a linear layer belongs to, from its module path."""
    leaf = name.rsplit(".", 1)[-1]
    if leaf in ("lm_head", "embed_out", "output"):
        return UNEMBED
    if "attn" in name or "attention" in name:
        return ATTN
    if "mlp" in name or "feed_forward" in name or "ffn" in name:
        return MLP
    return None


class LoRAAdapters:
    """Owns the `LoRALinear` wrappers of one model and the adapters inside them."""

    def __init__(self, model: nn.Module) -> None:
        self.router = AdapterRouter()
        self.modules: dict[str, LoRALinear] = {}
        self.specs: dict[str, AdapterSpec] = {}
        self.pins: dict[str, int] = {}  # adapters in use by running samples: removal waits for them
        self._doomed: set[str] = set()
        self.cache_max_adapters = CACHE_MAX_ADAPTERS
        self.cache_max_bytes = CACHE_MAX_BYTES
        self._cached: OrderedDict[str, _CacheEntry] = OrderedDict()  # evictable adapters, least recently used first
        targets = [
            (name, module, classify_linear(name))
            for name, module in model.named_modules()
            if isinstance(module, nn.Linear)
        ]
        for name, module, kind in targets:
            if kind is None:
                continue
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            wrapper = LoRALinear(module, self.router, kind)
            setattr(parent, attr, wrapper)
            self.modules[name] = wrapper

    def target_names(self, spec: AdapterSpec) -> list[str]:
        wanted = {ATTN: spec.train_attn, MLP: spec.train_mlp, UNEMBED: spec.train_unembed}
        return [name for name, m in self.modules.items() if wanted[m.kind]]

    def add(self, key: str, spec: AdapterSpec, trainable: bool = True) -> list[torch.Tensor]:
        """Create adapter `key`: A ~ U(+-1/sqrt(in)) from `spec.seed`, B = 0 (so it starts as the base)."""
        if key in self.specs:
            raise ValueError(f"adapter {key!r} already exists")
        seed = spec.seed if spec.seed is not None else secrets.randbits(63)
        generator = torch.Generator().manual_seed(seed)
        params = []
        for name in self.target_names(spec):
            module = self.modules[name]
            bound = 1.0 / math.sqrt(module.in_features)
            A = (torch.rand(module.in_features, spec.rank, generator=generator) * 2 - 1) * bound
            B = torch.zeros(spec.rank, module.out_features)
            A.requires_grad_(trainable)
            B.requires_grad_(trainable)
            module.adapters[key] = LoRAWeights(A, B, spec.alpha / spec.rank)
            params += [A, B]
        self.specs[key] = spec
        return params

    def pin(self, key: str | None) -> None:
        if key is not None:
            self.pins[key] = self.pins.get(key, 0) + 1
            self._touch(key)

    def unpin(self, key: str | None) -> None:
        """Release one pin; the last one removes a doomed adapter and lets the cache shrink to its limits."""
        if key is None or key not in self.pins:
            return
        self.pins[key] -= 1
        if self.pins[key] == 0:
            del self.pins[key]
            self._touch(key)
            if key in self._doomed:
                self._doomed.discard(key)
                self.remove(key)
                release_freed_memory()
            self.evict_cached()

    def remove(self, key: str) -> None:
        """Delete adapter `key` now, or once the samples using it are done."""
        if key in self.pins:
            self._doomed.add(key)
            return
        self._delete(key)

    def _delete(self, key: str) -> None:
        for module in self.modules.values():
            module.adapters.pop(key, None)
            if module.stacked is not None and key in module.stacked.keys:
                module.stacked = None  # holds a copy of the removed adapter
        self.specs.pop(key, None)
        self._cached.pop(key, None)

    # the cache of read-only adapters

    def _touch(self, key: str) -> None:
        entry = self._cached.get(key)
        if entry is not None:
            entry.used = True
            self._cached.move_to_end(key)

    def cached_keys(self) -> list[str]:
        """Evictable adapters, least recently used first."""
        return list(self._cached)

    def evict_cached(self, now: float | None = None) -> list[str]:
        """Remove least recently used cached adapters until the cache is within its limits; returns their keys.

        Pinned adapters are never evicted, nor unpinned ones loaded less than CACHE_GRACE_SECONDS
        ago that were never pinned (a request loaded them and has not started yet); while they
        stay, the cache may exceed its limits.
        """
        now = time.monotonic() if now is None else now
        count, size = len(self._cached), sum(e.nbytes for e in self._cached.values())
        evicted = []
        for key, entry in list(self._cached.items()):
            if count <= self.cache_max_adapters and size <= self.cache_max_bytes:
                break
            if key in self.pins or (not entry.used and now - entry.loaded_at < CACHE_GRACE_SECONDS):
                continue
            self._delete(key)
            count, size = count - 1, size - entry.nbytes
            evicted.append(key)
        if evicted:
            release_freed_memory()
        return evicted

    def nbytes(self, key: str | None = None) -> int:
        """Bytes held by adapter `key` (every adapter with None): weights and their gradients."""
        total = 0
        for module in self.modules.values():
            for k, w in module.adapters.items():
                if key is None or k == key:
                    total += sum(t.nbytes + (t.grad.nbytes if t.grad is not None else 0) for t in (w.A, w.B))
        return total

    def parameters(self, key: str) -> list[torch.Tensor]:
        return [p for _, p in self.named_parameters(key)]

    def named_parameters(self, key: str) -> list[tuple[str, torch.Tensor]]:
        out = []
        for name, module in self.modules.items():
            w = module.adapters.get(key)
            if w is not None:
                out += [(f"{name}.lora_A", w.A), (f"{name}.lora_B", w.B)]
        return out

    def clone(self, source: str, key: str) -> None:
        """Freeze a copy of adapter `source` under `key` (a sampler snapshot). A `key` that exists with the same
        shapes is overwritten in place (no new memory): rows decoding on it read the new values at their next
        forward (the inflight target)."""
        self._doomed.discard(key)  # a new copy under a key whose old copy awaits removal: keep the new one
        with torch.no_grad():
            for module in self.modules.values():
                w, old = module.adapters.get(source), module.adapters.get(key)
                if w is None:
                    module.adapters.pop(key, None)
                elif old is not None and old.A.shape == w.A.shape and old.B.shape == w.B.shape:
                    old.A.copy_(w.A)
                    old.B.copy_(w.B)
                    old.scale = w.scale
                else:
                    module.adapters[key] = LoRAWeights(w.A.detach().clone(), w.B.detach().clone(), w.scale)
        self.specs[key] = self.specs[source]

    def export(self, key: str) -> dict[str, torch.Tensor]:
        """The adapter as PEFT-named tensors: lora_A (r, in) and lora_B (out, r)."""
        state = {}
        for name, module in self.modules.items():
            w = module.adapters.get(key)
            if w is not None:
                state[f"base_model.model.{name}.lora_A.weight"] = w.A.detach().T.contiguous()
                state[f"base_model.model.{name}.lora_B.weight"] = w.B.detach().T.contiguous()
        return state

    def load(self, key: str, spec: AdapterSpec, state: dict[str, torch.Tensor], trainable: bool = False,
             evictable: bool | None = None) -> None:
        """Install PEFT-named tensors (as written by `export`) as adapter `key` (replacing it if present).

        `evictable` (default: not `trainable`) puts it in the cache of read-only adapters, which
        then evicts its least recently used members beyond its limits (see `evict_cached`).
        """
        self._delete(key)
        self._doomed.discard(key)
        for name, module in self.modules.items():
            a = state.get(f"base_model.model.{name}.lora_A.weight")
            b = state.get(f"base_model.model.{name}.lora_B.weight")
            if a is None or b is None:
                continue
            A = a.T.contiguous().float().requires_grad_(trainable)
            B = b.T.contiguous().float().requires_grad_(trainable)
            module.adapters[key] = LoRAWeights(A, B, spec.alpha / spec.rank)
        self.specs[key] = spec
        if evictable is None:
            evictable = not trainable
        if evictable:
            self._cached[key] = _CacheEntry(self.nbytes(key), time.monotonic())
            self.evict_cached()


@dataclass
class _CacheEntry:
    nbytes: int
    loaded_at: float  # time.monotonic()
    used: bool = False  # pinned at least once
