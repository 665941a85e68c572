"""`make bench`: run every benchmark, one after another, and write bench/RESULTS.md.

Each benchmark prints one JSON line; this collects them with the machine and commit, so the
ratios (never absolute seconds alone) can be compared across commits on the same machine kind,
and opens the report with the performance issue's targets, met or not.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

BENCHES = ["train", "overhead", "multitenant", "weights_to_sampler", "sample", "llama_cpp", "console_pages",
           "openai_vs_sdk", "submit_latency"]
OUT = Path(__file__).resolve().parent / "RESULTS.md"
# (bench, figure, ">=" or "<=", target, what it measures): the targets of the performance issue
TARGETS = [
    ("train", "ratio_vs_hf_peft", ">=", 1.5, "train tokens/s vs HF + PEFT"),
    ("multitenant", "tenants8_vs_ideal", ">=", 0.8, "8 tenants x batch 1 vs 1 tenant x batch 8"),
    ("overhead", "overhead_fraction", "<=", 0.10, "SDK + HTTP step time over in-process"),
    ("weights_to_sampler", "tinkerd_ms", "<=", 200, "optim_step done -> first token from the new weights (ms)"),
    ("sample", "ratio_b16", ">=", 8, "sampled tokens/s at batch 16 vs HF generate"),
    ("sample", "mixed_adapters_vs_one", ">=", 0.9, "16 rows of 16 different adapters vs 16 rows of one (tok/s)"),
    ("llama_cpp", "tinkerd_vs_llama_f32_b1", ">=", 1, "fp32 batch-1 decode tok/s vs llama.cpp F32, same weights"),
    ("llama_cpp", "tinkerd_vs_roofline_b1", ">=", 0.8, "fp32 batch-1 decode vs the bandwidth roofline"),
    ("llama_cpp", "tinkerd_vs_llama_f32_prefill", ">=", 1, "256-token prefill tok/s vs llama.cpp F32"),
    ("llama_cpp", "tinkerd_reduced_vs_llama_q8_0_b1", ">=", 1, "opt-in reduced precision batch-1 decode vs llama.cpp Q8_0"),
    ("openai_vs_sdk", "openai_vs_sdk_paired_median", ">=", 0.9, "16 streaming OpenAI chats vs the same 16 SDK samples (tok/s)"),
    ("submit_latency", "probe_submit_p99_ms", "<=", 100, "p99 submit (heartbeat, sample, forward) with 512 in flight (ms)"),
    ("submit_latency", "probe_retrieve_p99_ms", "<=", 2000, "p99 retrieve of a finished future with 512 in flight (ms)"),
    ("console_pages", "slowest_median_ms", "<=", 200, "slowest console page or curves fetch, 200 runs / 10,000 steps (ms)"),
]


def target_rows(results: list[dict]) -> list[str]:
    """The targets table: each target's figure as measured in this run, and whether it is met."""
    by_name = {r["bench"]: r for r in results}
    rows = ["| target | figure | wanted | measured | met |\n", "|---|---|---|---|---|\n"]
    for bench, figure, sense, wanted, what in TARGETS:
        value = by_name.get(bench, {}).get(figure)
        if not isinstance(value, (int, float)):
            verdict, shown = "not measured", "-"
        else:
            verdict, shown = ("yes" if (value >= wanted if sense == ">=" else value <= wanted) else "no"), f"{value:g}"
        rows.append(f"| {what} | {bench}.{figure} | {sense} {wanted:g} | {shown} | {verdict} |\n")
    return rows


def main() -> None:
    names = sys.argv[1:] or BENCHES
    results = []
    for name in names:
        started = time.time()
        proc = subprocess.run([sys.executable, "-m", f"bench.{name}"], capture_output=True, text=True)
        lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
        if proc.returncode != 0 or not lines:
            print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
            results.append({"bench": name, "error": f"exit {proc.returncode}"})
        else:
            results.append(json.loads(lines[-1]))
        print(json.dumps(results[-1]), f"({time.time() - started:.0f} s)", flush=True)
    machine = next((r["machine"] for r in results if "machine" in r), {})
    body = ["# Benchmark results\n", f"Machine: {json.dumps(machine)}  \nRun: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n",
            "\n## Targets\n\n", *target_rows(results)]
    for r in results:
        figures = {k: v for k, v in r.items() if k not in ("bench", "machine")}
        body.append(f"\n## {r['bench']}\n\n| figure | value |\n|---|---|\n")
        body += [f"| {k} | {v} |\n" for k, v in figures.items()]
    OUT.write_text("".join(body))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
