"""What every recipe shares: `key=value` config parsing, a tinker service (a local tinkerd when no URL is
given), chat templating, parallel sampling and a metrics logger (metrics.jsonl + a PNG of the curves).

Recipes import only this module, the tinker SDK, numpy/torch and tqdm.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import sys
import time
import types as pytypes
import typing
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

# The SDK loads the tokenizer by hub name. tinkerd writes it into the local Hugging Face cache when it
# starts, so offline mode makes that load instant (set HF_HUB_OFFLINE=0 to talk to hosted Tinker).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TINKER_TELEMETRY", "0")

import tinker  # noqa: E402
from tinker import types  # noqa: E402
from tqdm import tqdm  # noqa: E402

# The SDK warns "Retrying request ... because of try_again" each time a long-poll for a queued future
# expires; with a hundred sampling futures in flight that is normal, not a problem worth a line each.
logging.getLogger("tinker.lib.api_future_impl").setLevel(logging.ERROR)

EMBEDDED_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"


# ---------------------------------------------------------------------------------------------- config

@dataclasses.dataclass
class BaseConfig:
    """Fields every recipe has. Recipes subclass it and add their own (all with defaults)."""
    base_url: str | None = None  # a running server; None: $TINKER_BASE_URL, else start a local tinkerd
    base_model: str = EMBEDDED_MODEL
    log_dir: str | None = None  # None: runs/<recipe name>
    rank: int = 16
    seed: int = 0


def _convert(text: str, kind) -> object:
    if typing.get_origin(kind) in (typing.Union, pytypes.UnionType):
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        return None if text.lower() in ("none", "null", "") else _convert(text, args[0])
    if kind is bool:
        if text.lower() not in ("1", "0", "true", "false", "yes", "no"):
            raise ValueError(f"not a boolean: {text!r}")
        return text.lower() in ("1", "true", "yes")
    return kind(text)


def parse_config(cls, argv: list[str] | None = None, **overrides):
    """Build a `cls` dataclass from `key=value` arguments (`sys.argv[1:]` by default) and keyword overrides."""
    hints = typing.get_type_hints(cls)
    values = dict(overrides)
    for arg in sys.argv[1:] if argv is None else argv:
        key, sep, text = arg.partition("=")
        if not sep or key not in hints:
            known = ", ".join(f.name for f in dataclasses.fields(cls))
            raise SystemExit(f"bad argument {arg!r}: expected key=value with key one of: {known}")
        try:
            values[key] = _convert(text, hints[key])
        except ValueError as e:
            raise SystemExit(f"bad value for {key}: {e}") from None
    return cls(**values)


def log_dir_for(config: BaseConfig, recipe: str) -> Path:
    return Path(config.log_dir or Path("runs") / recipe)


# --------------------------------------------------------------------------------------------- service

@contextmanager
def service_client(config: BaseConfig, log_dir: Path) -> Iterator[tinker.ServiceClient]:
    """A tinker ServiceClient for `config.base_url` (or $TINKER_BASE_URL). Without either, start a local
    tinkerd for the duration of the block (data in `log_dir/server`, converted models in
    $TINKERD_MODEL_CACHE or ~/.cache/tinkerd/models, so only the very first start converts the model).
    The client is closed when the block ends (its session finished, its heartbeat stopped), before a local
    server stops."""
    api_key = os.environ.get("TINKER_API_KEY", "tml-cookbook")
    url = config.base_url or os.environ.get("TINKER_BASE_URL")
    if url:
        with tinker.ServiceClient(base_url=url, api_key=api_key) as service:
            yield service
        return
    from tinkerd.local_server import LocalServer  # only needed when we run the server ourselves

    cache = Path(os.environ.get("TINKERD_MODEL_CACHE", Path.home() / ".cache" / "tinkerd" / "models"))
    print(f"starting a local tinkerd (model cache {cache}, log {log_dir / 'server' / 'server.log'}) ...")
    with LocalServer(log_dir / "server", model_cache=cache) as server:
        print(f"tinkerd is up at {server.url}")
        with tinker.ServiceClient(base_url=server.url, api_key=api_key) as service:
            yield service


# ------------------------------------------------------------------------------------------------ chat

def messages(user: str, system: str | None = None) -> list[dict]:
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]


def prompt_tokens(tokenizer, msgs: list[dict]) -> list[int]:
    """The chat up to and including the assistant header: what the model continues."""
    return list(tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False))


def completion_tokens(tokenizer, answer: str) -> list[int]:
    """An assistant reply as the model should produce it: the text, then the end-of-turn token."""
    return tokenizer.encode(answer, add_special_tokens=False) + [tokenizer.eos_token_id]


def decode(tokenizer, tokens: list[int]) -> str:
    return tokenizer.decode(tokens, skip_special_tokens=True).strip()


def sft_datum(prompt: list[int], completion: list[int]) -> types.Datum:
    """Next-token prediction over prompt + completion; only the completion's tokens carry weight."""
    tokens = prompt + completion
    weights = [0.0] * (len(prompt) - 1) + [1.0] * len(completion)
    return types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                       loss_fn_inputs={"target_tokens": tokens[1:], "weights": weights})


def rl_datum(prompt: list[int], tokens: list[int], logprobs: list[float], advantages) -> types.Datum:
    """A policy-gradient datum (`importance_sampling` / `ppo` losses): the sampled tokens after the prompt, the
    sampler's logprobs of them and an advantage per sampled token (one number: the same on every token);
    prompt positions carry advantage 0."""
    n, tokens = len(prompt) - 1, list(tokens)
    advantages = [float(advantages)] * len(tokens) if isinstance(advantages, (int, float)) else list(advantages)
    return types.Datum(model_input=types.ModelInput.from_ints(prompt + tokens[:-1]),
                       loss_fn_inputs={"target_tokens": prompt[1:] + tokens, "logprobs": [0.0] * n + list(logprobs),
                                       "advantages": [0.0] * n + advantages})


def adam(learning_rate: float) -> types.AdamParams:
    return types.AdamParams(learning_rate=learning_rate, beta1=0.9, beta2=0.95, eps=1e-8)


def stop_params(tokenizer, max_tokens: int, temperature: float, seed: int | None = None) -> types.SamplingParams:
    return types.SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed,
                                stop=[tokenizer.eos_token_id])


def sample_all(sampler, prompts: list[list[int]], params: types.SamplingParams, num_samples: int = 1) -> list:
    """Sample every prompt at once (all requests in flight together, so the server batches them);
    returns one list of SampledSequence per prompt."""
    futures = [sampler.sample(types.ModelInput.from_ints(p), num_samples, params) for p in prompts]
    return [f.result().sequences for f in futures]


# --------------------------------------------------------------------------------------------- metrics

class MetricsLogger:
    """Appends one JSON object per `log()` to `log_dir/metrics.jsonl`, prints it above the progress bar,
    and at `close()` plots every metric against `step` into `log_dir/<plot_name>`."""

    def __init__(self, log_dir: Path, config=None, plot_name: str = "curves.png") -> None:
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        if config is not None:
            (self.log_dir / "config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2) + "\n")
        self.file = open(self.log_dir / "metrics.jsonl", "w")
        self.plot_path = self.log_dir / plot_name
        self.rows: list[dict] = []
        self.start = time.time()

    def log(self, step: int, **metrics: float) -> None:
        row = {"step": step, **{k: float(v) for k, v in metrics.items()}, "elapsed_s": round(time.time() - self.start, 1)}
        self.rows.append(row)
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        shown = "  ".join(f"{k} {v:.4g}" for k, v in row.items() if k not in ("step", "elapsed_s"))
        tqdm.write(f"step {step:4d}  {shown}")

    def plot(self, panels: dict[str, list[str]] | None = None) -> Path | None:
        """One panel per metric, or the given panels: {title: [metric keys drawn together]}."""
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("matplotlib is not installed: no plot (metrics.jsonl has the numbers)")
            return None
        if panels is None:
            keys = [k for k in dict.fromkeys(k for r in self.rows for k in r) if k not in ("step", "elapsed_s")]
            panels = {k: [k] for k in keys}
        if not panels:
            return None
        cols = min(3, len(panels))
        rows = math.ceil(len(panels) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.2 * rows), squeeze=False)
        for ax, (title, keys) in zip(axes.flat, panels.items()):
            for key in keys:
                points = [(r["step"], r[key]) for r in self.rows if key in r and math.isfinite(r[key])]
                if points:
                    ax.plot(*zip(*points), marker="o" if len(points) < 30 else None, markersize=3, label=key)
            if len(keys) > 1:
                ax.legend(fontsize=8)
            ax.set_title(title)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[len(panels):]:
            ax.axis("off")
        fig.tight_layout()
        fig.savefig(self.plot_path, dpi=100)
        plt.close(fig)
        return self.plot_path

    def close(self, panels: dict[str, list[str]] | None = None) -> None:
        self.file.close()
        path = self.plot(panels)
        print(f"metrics: {self.log_dir / 'metrics.jsonl'}" + (f", plot: {path}" if path else ""))



def next_token_logprobs(sampler, requests: list[tuple[list[int], list[int]]], topk: int = 20) -> list[list[float]]:
    """For each (prompt, option tokens): the logprob of each option as the next token. A model used as a grader or
    judge reads its verdict this way (e.g. the tokens "Yes" and "No" after a question). One greedy one-token
    `sample` per prompt with its top-k logprobs, all in flight together (the server batches them; on tinkerd
    this is ~10x faster than `compute_logprobs` of each option). An option outside the top k gets the k-th
    logprob, an upper bound."""
    params = types.SamplingParams(max_tokens=1, temperature=0.0)
    futures = [sampler.sample(types.ModelInput.from_ints(p), 1, params, topk_sample_logprobs=topk) for p, _ in requests]
    out = []
    for f, (_, options) in zip(futures, requests):
        top = dict(f.result().sequences[0].topk_logprobs[0])
        out.append([top.get(t, min(top.values())) for t in options])
    return out


def grpo_data(prompts: list[list[int]], groups: list, rewards: list[list[float]]) -> list[types.Datum]:
    """GRPO-style policy-gradient data: each prompt's sampled answers with advantage = reward - the group's mean.
    A group whose answers all scored the same carries no signal and is left out."""
    data = []
    for prompt, seqs, rs in zip(prompts, groups, rewards):
        mean = sum(rs) / len(rs)
        if any(r != mean for r in rs):
            data += [rl_datum(prompt, s.tokens, s.logprobs, r - mean) for s, r in zip(seqs, rs)]
    return data


def yes_probability(grader, tokenizer, prompts: list[list[int]]) -> list[float]:
    """A model grader's verdict on each prompt (a Yes/No question): P(Yes) against P(No) as its next token."""
    options = [tokenizer.encode(v, add_special_tokens=False)[0] for v in ("Yes", "No")]
    scores = next_token_logprobs(grader, [(p, options) for p in prompts])
    return [1 / (1 + math.exp(no - yes)) for yes, no in scores]
