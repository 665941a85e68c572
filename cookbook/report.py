"""Regenerate the results table of cookbook/README.md from the recipes' full runs.

    python -m cookbook.report [runs_dir=runs]        # `make cookbook-report` runs every recipe first

Each row is formatted from `<runs_dir>/<recipe>/summary.json`: the number the recipe reached, the command
that ran it (the `key=value` arguments that differ from its `Config` defaults, from `config.json`) and the
wall-clock time (`wall_time_s` of the summary, else the `elapsed_s` of the last row of `metrics.jsonl`).
A recipe without a summary keeps the row the README already has, so re-running a single recipe only
changes its own row.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import re
import sys
from pathlib import Path

README = Path(__file__).parent / "README.md"
HEADER = "| recipe | what | measured (held out) | command | wall clock |"
NOT_ARGUMENTS = {"base_url", "log_dir"}  # where it ran, not how


def pct(x: float) -> str:
    return f"{100 * x:.1f}".rstrip("0").rstrip(".") + " %"


def _ppo_value(s: dict) -> str:
    b, a, v = s["before"], s["after"], s["mean_adv_var"]
    return (f"reward at temperature 1: {b['test_reward_critic']:.2f} -> {a['test_reward_critic']:.2f} with the critic, "
            f"{a['test_reward_nobaseline']:.2f} without; advantage variance {v['critic']:.3f} vs "
            f"{v['nobaseline']:.3f}")


def _selfplay(s: dict) -> str:
    b, a, ref = s["before"], s["after"], s["reference_vs_random"]
    return (f"win rate vs a random player (greedy) {pct(b['eval_win_vs_random_t0'])} -> "
            f"{pct(a['eval_win_vs_random_t0'])} (optimal play: {pct(ref['optimal'])})")


def _chat_pipeline(s: dict) -> str:
    base, sft, rl = s["base"], s["sft"], s["rl"]
    return (f"addition accuracy {pct(base['eval_add_acc'])} -> SFT {pct(sft['eval_add_acc'])} -> RL "
            f"{pct(rl['eval_add_acc'])}; knows its name {pct(base['eval_identity'])} -> {pct(rl['eval_identity'])}")


def _continual(s: dict) -> str:
    seq, replay = s["after_task_b_sequential"], s["after_task_b_replay"]
    return (f"share of A's NLL gain kept after B: {pct(seq['a_gain_retained'])} sequential vs "
            f"**{pct(replay['a_gain_retained'])}** with replay (A's fact named: {pct(seq['a_recall'])} vs "
            f"{pct(replay['a_recall'])}, {pct(s['after_task_a']['a_recall'])} before B); B's fact named "
            f"{pct(replay['b_recall'])}")


def _rl_grader(s: dict) -> str:
    r1, r2, g = s["round1"], s["round2"], s["grader_lesson"]
    return (f"true accuracy (one word) {pct(r1['before']['eval_true_acc'])} -> {pct(r1['after']['eval_true_acc'])} "
            f"with the base grader (agreeing with the truth {pct(r1['after']['eval_grader_agreement'])}); grader SFT "
            f"on its mistakes: agreement {pct(g['agreement_before'])} -> {pct(g['agreement_after'])}; round 2 with "
            f"it: {pct(r2['before']['eval_true_acc'])} -> {pct(r2['after']['eval_true_acc'])} (see its README)")


def _debate(s: dict) -> str:
    b, a, ref = s["before"], s["after"], s["reference"]
    return (f"judge accuracy {pct(b['eval_judge_acc'])} -> {pct(a['eval_judge_acc'])} (honest debater shows the "
            f"answer {pct(b['eval_honest_shows_key'])} -> {pct(a['eval_honest_shows_key'])}; random moves "
            f"{pct(ref['judge_acc_random_moves'])}, best play {pct(ref['judge_acc_key_vs_best_decoy'])})")


def _text_game(s: dict) -> str:
    b, a, ref = s["before"], s["after"], s["reference"]
    return (f"success rate (greedy) {pct(b['eval_success'])} -> {pct(a['eval_success'])} (random player "
            f"{pct(ref['random'])}, scripted optimal {pct(ref['optimal'])}); key taken {pct(b['eval_key_taken'])} -> "
            f"{pct(a['eval_key_taken'])}")


# recipe: (what it does, how its summary.json reads as a result)
RECIPES = {
    "sft": ("chat SFT on an invented knowledge set (200 Q/A)",
            lambda s: f"NLL per answer token {s['test_nll_before']:.2f} -> {s['test_nll_after']:.3f}; right fact "
                      f"named {pct(s['recall_before'])} -> {pct(s['recall_after'])}"),
    "rl_math": ("GRPO-style RL, exact-match verifier, two-digit additions",
                lambda s: f"greedy accuracy {pct(s['before']['eval_greedy_acc'])} -> {pct(s['after']['eval_greedy_acc'])}"
                          f" (temperature 1: {pct(s['before']['eval_t1_acc'])} -> {pct(s['after']['eval_t1_acc'])})"),
    "dpo": ("DPO via `forward_backward_custom`, generated preference pairs",
            lambda s: f"preference accuracy {pct(s['before']['test_pref_acc'])} -> {pct(s['after']['test_pref_acc'])}"),
    "distill": ("on-policy distillation of a system prompt (teacher scores with `compute_logprobs`)",
                lambda s: f"reverse KL per token {s['before']['test_reverse_kl']:.3f} -> "
                          f"{s['after']['test_reverse_kl']:.3f}"),
    "continual": ("task A then task B with LoRA: sequential vs 25 % replay", _continual),
    "ppo_value": ("PPO with a critic LoRA (value head from two token logits) vs no baseline, sequence continuation",
                  _ppo_value),
    "selfplay": ("self-play on Nim against frozen snapshots of itself", _selfplay),
    "chat_pipeline": ("base -> SFT -> RL in one script, then a chat REPL on the final checkpoint", _chat_pipeline),
    "rl_grader": ("RL with a model as the grader (P(Yes) of a rubric), then the grader fine-tuned on its mistakes",
                  _rl_grader),
    "debate": ("two copies of the policy reveal evidence for opposite answers to a frozen judge, zero-sum", _debate),
    "text_game": ("multi-turn RL in a text adventure (find the key, open the chest, 10 turns)", _text_game),
}


def command(name: str, run: Path) -> str:
    """`python -m cookbook.<name>.train` plus the arguments of the run that are not the defaults."""
    config_class = importlib.import_module(f"cookbook.{name}.train").Config
    used = json.loads((run / "config.json").read_text())
    changed = [f"{f.name}={used[f.name]}" for f in dataclasses.fields(config_class)
               if f.name in used and f.name not in NOT_ARGUMENTS and used[f.name] != f.default]
    return "`" + " ".join([f"python -m cookbook.{name}.train", *changed]) + "`"


def wall_clock(run: Path, summary: dict) -> str:
    seconds = summary.get("wall_time_s")
    if seconds is None:
        seconds = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["elapsed_s"]
    return f"{seconds / 60:.1f} min"


def table(runs_dir: Path, old_rows: dict[str, str]) -> list[str]:
    lines = [HEADER, "|---|---|---|---|---|"]
    for name, (what, fmt) in RECIPES.items():
        run = runs_dir / name
        if (run / "summary.json").exists():
            summary = json.loads((run / "summary.json").read_text())
            lines.append(f"| [`{name}`]({name}/) | {what} | {fmt(summary)} | {command(name, run)} | "
                         f"{wall_clock(run, summary)} |")
        else:
            lines.append(old_rows.get(name, f"| [`{name}`]({name}/) | {what} | (not run yet) | | |"))
    return lines


def main(argv: list[str]) -> None:
    runs_dir = Path("runs")
    for arg in argv:
        key, _, value = arg.partition("=")
        if key != "runs_dir":
            raise SystemExit(f"bad argument {arg!r}: expected runs_dir=PATH")
        runs_dir = Path(value)
    text = README.read_text().splitlines()
    start = next(i for i, line in enumerate(text) if line.startswith("| recipe |"))  # the table, whatever its columns
    end = next((i for i in range(start, len(text)) if not text[i].startswith("|")), len(text))
    old_rows = {m.group(1): line for line in text[start + 2:end] if (m := re.match(r"\| \[`(\w+)`\]", line))}
    text[start:end] = table(runs_dir, old_rows)
    README.write_text("\n".join(text) + "\n")
    found = [n for n in RECIPES if (runs_dir / n / "summary.json").exists()]
    print(f"{README}: table rebuilt from {runs_dir}/<recipe>/summary.json for {', '.join(found) or 'no recipe'}")


if __name__ == "__main__":
    main(sys.argv[1:])
