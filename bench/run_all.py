"""`make bench`: run every benchmark, one after another, and write bench/RESULTS.md.

Each benchmark prints one JSON line; this collects them with the machine and commit, so the
ratios (never absolute seconds alone) can be compared across commits on the same machine kind.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

BENCHES = ["train", "overhead", "multitenant", "weights_to_sampler", "sample"]
OUT = Path(__file__).resolve().parent / "RESULTS.md"


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
    body = ["# Benchmark results\n", f"Machine: {json.dumps(machine)}  \nRun: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n"]
    for r in results:
        figures = {k: v for k, v in r.items() if k not in ("bench", "machine")}
        body.append(f"\n## {r['bench']}\n\n| figure | value |\n|---|---|\n")
        body += [f"| {k} | {v} |\n" for k, v in figures.items()]
    OUT.write_text("".join(body))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
