"""The in-process `Sampler`: continuous batching over a shared KV cache, per-row adapters.

A request is validated and prefilled once (queued requests are prefilled together); its prompt
cache is repeated for its `num_samples` rows, which join the running decode batch of their base
model in a preallocated slot cache (see `decoder` and `kv_cache`).
Each `step()` draws one token for every active row, retires finished rows, and runs one forward
for the rest, so new requests join between steps and rows of different adapters decode together.

Sample i of a request draws from its own generator seeded with `seed + i`, so a request is
reproducible whatever else runs, and `num_samples > 1` gives different samples. Returned
logprobs are the model's own (temperature 1, before top-k/top-p), the quantity the trainer's
`forward` reports for those tokens. Returned tokens include the stop token or stop string.
"""

from __future__ import annotations

import collections
import logging
import math
import queue
import secrets
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tinkerd.engine.adapter_files import read_peft_adapter
from tinkerd.engine.batching import check_token_range
from tinkerd.engine.decoder import Decoder
from tinkerd.engine.interface import AdapterRef, SampleTask, TokenProgress
from tinkerd.engine.kv_cache import SlotKVCache
from tinkerd.engine.runtime import ModelRuntime
from tinkerd.protocol.sample import MAX_PROMPT_ALT_TOKENS
from tinkerd.protocol.types import TOPK_SENTINEL_LOGPROB, BadRequest, SampledSequence, SampleResult, SamplingParams

log = logging.getLogger(__name__)

PREFILL_TOKENS_PER_STEP = 4096  # prompt tokens admitted per step (then running rows decode again)
PREFILL_TOKENS_PER_FORWARD = 2048  # padded tokens in one prefill forward
CDF_BLOCK = 256  # tokens per block of the two-level CDF inversion of a draw
SCORED_POSITIONS_PER_FORWARD = 512  # padded positions of prompts scored together (fp32 logits: 512 x V x 4 bytes)


@dataclass
class Pending:
    """A request in flight: its rows report into `sequences`."""

    request: SampleTask
    result: SampleResult
    remaining: int
    adapter_key: str | None


@dataclass
class DecodeRow:
    pending: Pending
    sample: int
    generator: torch.Generator
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    topk: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)  # with topk_sample_logprobs


@dataclass
class DecodeBatch:
    """The running rows of one base model: row i of `rows` is row i of the cache and of `logits`."""

    decoder: Decoder
    cache: SlotKVCache
    rows: list[DecodeRow] = field(default_factory=list)
    logits: torch.Tensor | None = None  # (rows, V) fp32, for the token each row draws next


class LocalSampler:
    def __init__(self, runtimes: dict[str, ModelRuntime]) -> None:
        self.runtimes = runtimes
        self.decoders = {name: Decoder(runtime) for name, runtime in runtimes.items()}
        self.incoming: queue.SimpleQueue[SampleTask] = queue.SimpleQueue()
        self.waiting: collections.deque[SampleTask] = collections.deque()
        self.batches: dict[str, DecodeBatch] = {}
        self.cancelled: set[str] = set()
        self.progress: list[TokenProgress] = []  # tokens of streaming requests drawn since `take_progress`

    # the Sampler protocol

    def submit(self, request: SampleTask) -> None:
        """Queue a request (any thread); it joins the batch at the next `step`."""
        self.incoming.put(request)

    def cancel(self, request_id: str) -> None:
        self.cancelled.add(request_id)

    def has_work(self) -> bool:
        return not self.incoming.empty() or bool(self.waiting) or any(b.rows for b in self.batches.values())

    def take_progress(self) -> list[TokenProgress]:
        """`StreamingSampler`: the tokens streaming requests drew since the last call."""
        progress, self.progress = self.progress, []
        return progress

    def active_rows(self) -> int:
        return sum(len(b.rows) for b in self.batches.values())

    @torch.no_grad()
    def step(self) -> list[tuple[str, SampleResult | BadRequest]]:
        """Admit queued requests, draw one token per active row, advance the survivors one position."""
        finished: list[tuple[str, SampleResult | Exception]] = []
        self._admit_waiting(finished)
        for name in list(self.batches):
            batch = self.batches[name]
            try:
                self._decode(self.runtimes[name], batch, finished)
            except Exception as exc:  # noqa: BLE001 - a shared forward failed: not one row's fault
                log.exception("sampler decode step of %s failed; its %d rows fail", name, len(batch.rows))
                self._fail_rows(self.runtimes[name], batch, batch.rows, exc, finished)
            if not batch.rows:
                del self.batches[name]  # frees its cache
        return finished

    def sample(self, adapter: AdapterRef, prompt: list[int], num_samples: int, params: SamplingParams,
               **scoring) -> SampleResult:
        """Run one request to completion (tests and in-process use); other queued work advances too.
        `scoring`: the `SampleTask` fields after `params` (prompt_logprobs, topk_sample_logprobs, ...)."""
        request_id = f"local-{secrets.token_hex(6)}"
        self.submit(SampleTask(request_id, adapter, list(prompt), num_samples, params, **scoring))
        while True:
            for done_id, outcome in self.step():
                if done_id == request_id:
                    if isinstance(outcome, Exception):
                        raise outcome
                    return outcome

    # admission

    def _runtime(self, base_model: str) -> ModelRuntime:
        runtime = self.runtimes.get(base_model)
        if runtime is None:
            raise BadRequest(f"base_model {base_model!r} is not served here; served: {sorted(self.runtimes)}")
        return runtime

    def _adapter_key(self, runtime: ModelRuntime, ref: AdapterRef) -> str | None:
        if ref.uri is None:
            return None
        key = ref.memory_key
        if key is not None:
            if key not in runtime.lora.specs:
                raise BadRequest(
                    f"sampler weights {key!r} are no longer in memory (only the newest snapshots per model "
                    "are kept); call save_weights_and_get_sampling_client again or save named sampler weights"
                )
            return key
        key = f"dir:{ref.uri}"
        if key not in runtime.lora.specs:
            spec, state = read_peft_adapter(Path(ref.uri))
            runtime.lora.load(key, spec, state)
        return key

    def _validate(self, runtime: ModelRuntime, request: SampleTask) -> None:
        params = request.params
        if not request.prompt:
            raise BadRequest("prompt: at least one token is required")
        if request.num_samples < 1:
            raise BadRequest(f"num_samples must be >= 1, got {request.num_samples}")
        check_token_range(np.asarray(request.prompt), runtime.vocab_size, "prompt")
        if len(request.prompt) + params.max_tokens > runtime.max_context:
            raise BadRequest(
                f"prompt ({len(request.prompt)} tokens) + sampling_params.max_tokens ({params.max_tokens}) exceeds "
                f"the model's context of {runtime.max_context}"
            )
        if params.stop_strings and runtime.tokenizer is None:
            raise BadRequest("sampling_params.stop: stop strings need a tokenizer, and this model has none")
        if not 0 <= request.topk_prompt_logprobs <= runtime.vocab_size:
            raise BadRequest(f"topk_prompt_logprobs must be in [0, {runtime.vocab_size}]")
        if not 0 <= request.topk_sample_logprobs <= runtime.vocab_size:
            raise BadRequest(f"topk_sample_logprobs must be in [0, {runtime.vocab_size}]")
        if not 0 <= request.prompt_alt_tokens_k <= MAX_PROMPT_ALT_TOKENS:
            raise BadRequest(f"prompt_alt_tokens_k must be in [0, {MAX_PROMPT_ALT_TOKENS}], got {request.prompt_alt_tokens_k}")
        scorable = len(request.prompt) - 1
        last_n = request.prompt_logprobs_last_n
        if last_n is not None:
            if not (request.prompt_logprobs or request.topk_prompt_logprobs > 0):
                raise BadRequest("prompt_logprobs_last_n applies to prompt logprobs; set prompt_logprobs")
            if not 1 <= last_n <= scorable:
                raise BadRequest(f"prompt_logprobs_last_n must be in [1, len(prompt) - 1 = {scorable}], got {last_n}")
        targets = request.target_prompt_logprobs
        if targets is not None:
            if targets.ndim != 2 or targets.shape[0] != scorable:
                raise BadRequest(f"target_prompt_logprobs: expected shape [len(prompt) - 1, K] = [{scorable}, K], "
                                 f"got {list(targets.shape)}")
            if targets.size and (targets.min() < -1 or targets.max() >= runtime.vocab_size):
                raise BadRequest(f"target_prompt_logprobs: token ids must be -1 (none) or in [0, {runtime.vocab_size})")

    def _admit_waiting(self, finished: list) -> None:
        """Validate queued requests and prefill them, many prompts per forward pass.

        At most PREFILL_TOKENS_PER_STEP prompt tokens are admitted per step, so running rows keep
        decoding while a flood of new requests arrives. Requests asking for prompt logprobs
        (they need logits at every position) are prefilled together in smaller forwards.
        """
        while not self.incoming.empty():
            self.waiting.append(self.incoming.get())
        groups: dict[tuple[str, bool], list[tuple[SampleTask, str | None]]] = {}  # (model, scores prompt)
        budget, admitted = PREFILL_TOKENS_PER_STEP, 0
        while self.waiting and (budget > 0 or admitted == 0):
            request = self.waiting.popleft()
            if request.request_id in self.cancelled:
                self.cancelled.discard(request.request_id)
                continue
            try:
                runtime = self._runtime(request.adapter.base_model)
                self._validate(runtime, request)
                key = self._adapter_key(runtime, request.adapter)
            except BadRequest as exc:
                finished.append((request.request_id, exc))
                continue
            groups.setdefault((runtime.name, request.scores_prompt), []).append((request, key))
            budget -= len(request.prompt)
            admitted += 1
        for (name, scored), group in groups.items():
            limit = SCORED_POSITIONS_PER_FORWARD if scored else PREFILL_TOKENS_PER_FORWARD
            group.sort(key=lambda item: len(item[0].prompt))
            chunk: list = []
            for item in group:  # bound the padded size of one prefill forward
                if chunk and (len(chunk) + 1) * len(item[0].prompt) > limit:
                    self._prefill_or_fail_alone(self.runtimes[name], chunk, finished)
                    chunk = []
                chunk.append(item)
            self._prefill_or_fail_alone(self.runtimes[name], chunk, finished)

    def _prefill_or_fail_alone(self, runtime: ModelRuntime, items: list[tuple[SampleTask, str | None]],
                               finished: list) -> None:
        """Prefill `items` together; if that fails, each on its own, so only the requests that fail by
        themselves are answered with their error (the running batch is left as it was for each)."""
        try:
            self._prefill(runtime, items)
        except Exception as exc:  # noqa: BLE001 - whatever it is, it must not reach the other tenants
            if len(items) > 1:
                for item in items:
                    self._prefill_or_fail_alone(runtime, [item], finished)
                return
            log.warning("sample request %s failed at admission: %s", items[0][0].request_id, exc)
            finished.append((items[0][0].request_id, exc))

    def _prefill(self, runtime: ModelRuntime, items: list[tuple[SampleTask, str | None]]) -> None:
        """One forward over the prompts into new cache rows; each request's row is repeated per sample.
        All or nothing: on an exception the batch and its cache are as they were before the call."""
        batch = self.batches.get(runtime.name)
        if batch is None:
            decoder = self.decoders[runtime.name]
            batch = self.batches[runtime.name] = DecodeBatch(decoder, decoder.new_cache())
        rows_before = batch.cache.rows
        try:
            logits, new_rows, repeats = self._prefill_rows(batch, items)
        except BaseException:
            batch.cache.keep(list(range(rows_before)))  # the new rows are the newest: this only forgets them
            if not batch.rows:
                del self.batches[runtime.name]
            raise
        for _, key in items:
            runtime.lora.pin(key)
        batch.logits = logits if batch.logits is None else torch.cat([batch.logits, logits])
        batch.rows += new_rows

    def _prefill_rows(self, batch: DecodeBatch, items: list[tuple[SampleTask, str | None]]):
        """The cache rows of `items` (added to `batch.cache`), their next-token logits and decode rows."""
        generators = [request_generators(request) for request, _ in items]  # before the cache is touched
        want_prompt = items[0][0].scores_prompt  # then every item does (`_admit_waiting` groups them)
        logits, rows = batch.decoder.prefill(batch.cache, [r.prompt for r, _ in items], [key for _, key in items],
                                             all_positions=want_prompt)
        new_rows, repeats = [], []
        for i, ((request, key), (row_generators, prompt_generator)) in enumerate(zip(items, generators)):
            result = SampleResult(sequences=[None] * request.num_samples)  # type: ignore[list-item]
            if want_prompt:
                fill_prompt_scores(result, logits[i, :len(request.prompt)], request, prompt_generator)
            pending = Pending(request, result, request.num_samples, key)
            new_rows += [DecodeRow(pending, j, generator) for j, generator in enumerate(row_generators)]
            repeats.append(request.num_samples)
        if want_prompt:  # each prompt's last position (right-padded)
            last = torch.tensor([len(r.prompt) - 1 for r, _ in items], device=logits.device)
            logits = logits[torch.arange(len(items), device=logits.device), last]
        batch.cache.repeat_rows(rows, repeats)
        logits = logits.index_select(0, torch.repeat_interleave(torch.arange(len(items)), torch.tensor(repeats)))
        return logits, new_rows, repeats

    # decoding

    def _decode(self, runtime: ModelRuntime, batch: DecodeBatch, finished: list) -> None:
        chosen = self._choose(batch, finished)
        logp = batch.logits.log_softmax(-1)
        chosen_lp = logp.gather(-1, chosen[:, None])[:, 0].tolist()
        top_k = min(max(r.pending.request.topk_sample_logprobs for r in batch.rows), logp.shape[-1])
        if top_k > 0:
            top_lp, top_ids = (t.numpy() for t in logp.topk(top_k, dim=-1))
        keep = []
        for i, row in enumerate(batch.rows):
            pending = row.pending
            if pending.request.request_id in self.cancelled:
                self._retire(runtime, row, None, finished)
                continue
            try:
                token = int(chosen[i])
                row.tokens.append(token)
                row.logprobs.append(chosen_lp[i])
                if top_k > 0 and (k := pending.request.topk_sample_logprobs) > 0:
                    row.topk.append((top_ids[i, :k].astype(np.int32), top_lp[i, :k]))
                if pending.request.stream:
                    self.progress.append(TokenProgress(pending.request.request_id, row.sample, token, chosen_lp[i],
                                                       row.topk[-1] if pending.request.topk_sample_logprobs else None))
                reason = stop_reason(runtime, pending.request.params, row.tokens)
            except Exception as exc:  # noqa: BLE001 - this request's rows fail, the rest keep decoding
                self._fail(pending, exc, finished)
                self._retire(runtime, row, None, finished)
                continue
            if reason is None:
                keep.append(i)
            else:
                self._retire(runtime, row, reason, finished)
        for i in [i for i in keep if batch.rows[i].pending.request.request_id in self.cancelled]:
            self._retire(runtime, batch.rows[i], None, finished)  # its request failed at a later row
            keep.remove(i)
        if len(keep) < len(batch.rows):
            order = batch.cache.keep(keep)
            batch.rows = [batch.rows[i] for i in order]
            chosen = chosen.index_select(0, torch.tensor(order, dtype=torch.long))
        if not batch.rows:
            return
        batch.logits = batch.decoder.decode(batch.cache, chosen, [r.pending.adapter_key for r in batch.rows])

    def _choose(self, batch: DecodeBatch, finished: list) -> torch.Tensor:
        """Every row's next token; if drawing fails, request by request, and a request that fails alone is
        failed (its rows drop out at this step, their token a placeholder)."""
        rows = batch.rows
        try:
            return choose_tokens(batch.logits, [r.pending.request.params for r in rows], [r.generator for r in rows])
        except Exception:  # noqa: BLE001 - find whose rows it was
            pass
        chosen = torch.zeros(len(rows), dtype=torch.long, device=batch.logits.device)
        by_request: dict[int, list[int]] = {}
        for i, row in enumerate(rows):
            by_request.setdefault(id(row.pending), []).append(i)
        for indices in by_request.values():
            pending = rows[indices[0]].pending
            index = torch.tensor(indices, device=batch.logits.device)
            try:
                chosen[index] = choose_tokens(batch.logits.index_select(0, index), [pending.request.params] * len(indices),
                                              [rows[i].generator for i in indices])
            except Exception as exc:  # noqa: BLE001
                self._fail(pending, exc, finished)
        return chosen

    def _fail(self, pending: Pending, exc: Exception, finished: list) -> None:
        """Answer a request with `exc` now; its rows still in the batch are dropped as they come (`cancelled`)."""
        request_id = pending.request.request_id
        if request_id in self.cancelled:
            return
        log.warning("sample request %s failed while decoding: %s: %s", request_id, type(exc).__name__, exc)
        finished.append((request_id, exc))
        self.cancelled.add(request_id)

    def _fail_rows(self, runtime: ModelRuntime, batch: DecodeBatch, rows: list[DecodeRow], exc: Exception,
                   finished: list) -> None:
        """Fail every request with rows in `batch` and empty it (its cache is freed with it)."""
        for row in list(rows):
            self._fail(row.pending, exc, finished)
            self._retire(runtime, row, None, finished)
        batch.rows, batch.logits = [], None
        batch.cache.keep([])

    def _retire(self, runtime: ModelRuntime, row: DecodeRow, reason: str | None, finished: list) -> None:
        pending = row.pending
        if reason is not None:
            topk = None
            if pending.request.topk_sample_logprobs > 0:
                topk = (np.stack([ids for ids, _ in row.topk]), np.stack([lp for _, lp in row.topk]))
            pending.result.sequences[row.sample] = SampledSequence(row.tokens, row.logprobs, reason, topk)
        pending.remaining -= 1
        if pending.remaining == 0:
            runtime.lora.unpin(pending.adapter_key)
            request_id = pending.request.request_id
            if request_id in self.cancelled:
                self.cancelled.discard(request_id)
            else:
                finished.append((request_id, pending.result))


def request_generators(request: SampleTask) -> tuple[list[torch.Generator], torch.Generator]:
    """Sample i draws from `seed + i`, prompt alternatives from `seed + num_samples`; a random seed when none
    is given. Seeds past torch's range [-2^63, 2^64) wrap modulo 2^64 (the edge refuses them anyway)."""
    seed = request.params.seed if request.params.seed is not None else secrets.randbits(62)

    def generator(value: int) -> torch.Generator:
        return torch.Generator().manual_seed(value if -(1 << 63) <= value < (1 << 64) else value % (1 << 64))

    return [generator(seed + j) for j in range(request.num_samples)], generator(seed + request.num_samples)


def stop_reason(runtime: ModelRuntime, params: SamplingParams, tokens: list[int]) -> str | None:
    last = tokens[-1]
    if last in params.stop_tokens or (params.stop_at_eos and last in runtime.eos_token_ids):
        return "stop"
    if params.stop_strings:
        longest = max(len(s) for s in params.stop_strings)
        tail = runtime.tokenizer.decode(tokens[-(longest + 8):])  # every token is at least one character
        if any(s in tail for s in params.stop_strings):
            return "stop"
    if len(tokens) >= params.max_tokens:
        return "length"
    return None


def fill_prompt_scores(result: SampleResult, logits_T_V: torch.Tensor, request: SampleTask,
                       generator: torch.Generator) -> None:
    """What a request asks of its prompt. Position t is scored given prompt[:t]; position 0, and
    positions before the last `prompt_logprobs_last_n`, get NaN (top-k: a sentinel row)."""
    logp = logits_T_V[:-1].log_softmax(-1)  # row i scores prompt[i + 1]
    n = len(request.prompt)
    first = 1 if request.prompt_logprobs_last_n is None else n - request.prompt_logprobs_last_n
    scored = logp[first - 1:]
    if request.prompt_logprobs:
        prompt = torch.tensor(request.prompt[first:], dtype=torch.long, device=logp.device)
        result.prompt_logprobs = [math.nan] * first + scored.gather(-1, prompt[:, None])[:, 0].tolist()
    k = request.topk_prompt_logprobs
    if k > 0:
        values, ids = scored.topk(k, dim=-1)  # sorted, best first
        top_ids = np.zeros((n, k), dtype=np.int32)
        top_lp = np.full((n, k), TOPK_SENTINEL_LOGPROB, dtype=np.float32)
        top_ids[first:] = ids.numpy()
        top_lp[first:] = values.numpy()
        result.topk_prompt_logprobs = (top_ids, top_lp)
    if request.target_prompt_logprobs is not None:
        ids = torch.from_numpy(request.target_prompt_logprobs).to(logp.device)
        scores = logp.gather(-1, ids.clamp(min=0))
        result.target_prompt_logprobs = torch.where(ids >= 0, scores, 0.0).numpy().astype(np.float32)
    k = request.prompt_alt_tokens_k
    if k > 0:
        temperature = request.params.temperature
        if temperature == 0 or n == 1:
            draws = logp.argmax(-1, keepdim=True).expand(-1, k)
        else:
            draws = torch.multinomial((logp / temperature).softmax(-1), k, replacement=True, generator=generator)
        result.prompt_alt_tokens = (draws.numpy().astype(np.int64), logp.gather(-1, draws).numpy().astype(np.float32))


def choose_tokens(logits_N_V: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator]) -> torch.Tensor:
    """One token per row: greedy at temperature 0, else temperature, top-k, top-p, then a seeded draw.

    Rows sharing sampling parameters are filtered together; each row's draw is one uniform number
    from its own generator, inverted through the row's cumulative distribution (`invert_cdf`: exact,
    and far cheaper than a multinomial over the vocabulary).
    """
    chosen = torch.empty(logits_N_V.shape[0], dtype=torch.long, device=logits_N_V.device)
    groups: dict[SamplingParams, list[int]] = {}
    for i, p in enumerate(params):
        groups.setdefault(p, []).append(i)
    for p, rows in groups.items():
        every_row = len(rows) == logits_N_V.shape[0]
        index = slice(None) if every_row else torch.tensor(rows, device=logits_N_V.device)
        z = logits_N_V if every_row else logits_N_V.index_select(0, index)
        if p.temperature == 0:
            chosen[index] = z.argmax(-1)
            continue
        if p.temperature != 1:
            z = z / p.temperature
        if 0 < p.top_k < z.shape[-1]:
            kth = z.topk(p.top_k, dim=-1).values[:, -1:]
            z = z.masked_fill(z < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_z, order = z.sort(dim=-1, descending=True)
            probs = sorted_z.softmax(-1)
            drop_sorted = probs.cumsum(-1) - probs > p.top_p  # keep the smallest prefix reaching top_p
            z = z.masked_fill(torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted), float("-inf"))
        u = torch.stack([torch.rand((), generator=generators[i], dtype=torch.float64) for i in rows])
        chosen[index] = invert_cdf(z.softmax(-1), u.to(z.device))
    return chosen


def invert_cdf(probs_R_V: torch.Tensor, u_R: torch.Tensor) -> torch.Tensor:
    """Per row, the first token whose cumulative probability (in float64) exceeds u times the row's total: an exact
    draw from each row's distribution for u ~ U[0, 1). In two levels, so no float64 cumsum runs over the whole
    vocabulary (sequential, 10-30 ms at 64 rows here): blocks of CDF_BLOCK tokens are summed (vectorised), the
    block is found among the blocks' cumulative sums, then the token within the block. Never a zero-probability
    token, whatever the rounding."""
    rows, vocab = probs_R_V.shape
    padded = F.pad(probs_R_V, (0, -vocab % CDF_BLOCK)) if vocab % CDF_BLOCK else probs_R_V
    blocks = padded.view(rows, -1, CDF_BLOCK)
    # the blocks' masses summed in float32 (cascaded: relative error ~5e-7 of a block's mass, below the float32
    # softmax's own), accumulated in float64; within the chosen block, float64 throughout
    block_cdf = blocks.sum(-1).double().cumsum(-1)  # (R, blocks)
    target = u_R * block_cdf[:, -1]
    block = torch.searchsorted(block_cdf, target[:, None], right=True)[:, 0]
    block = torch.minimum(block, (block_cdf < block_cdf[:, -1:]).sum(-1))  # the last block holding any mass
    before = torch.where(block > 0, block_cdf.gather(1, (block - 1).clamp(min=0)[:, None])[:, 0], 0.0)
    inner = blocks[torch.arange(rows, device=blocks.device), block].double().cumsum(-1)  # (R, CDF_BLOCK)
    offset = torch.searchsorted(inner, (target - before)[:, None], right=True)[:, 0]
    offset = torch.minimum(offset, (inner < inner[:, -1:]).sum(-1))  # the block's last token of nonzero mass
    return block * CDF_BLOCK + offset
