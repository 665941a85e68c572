"""Each cookbook recipe runs end to end with a tiny config and writes finite metrics.

These only prove the recipes run against tinkerd; the learning results are in each recipe's README.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from cookbook import common
from cookbook.chat_pipeline import train as chat_pipeline
from cookbook.continual import train as continual
from cookbook.distill import train as distill
from cookbook.dpo import train as dpo
from cookbook.ppo_value import train as ppo_value
from cookbook.rl_math import train as rl_math
from cookbook.selfplay import train as selfplay
from cookbook.sft import train as sft

pytestmark = pytest.mark.slow


def _few_facts(tmp_path, train: int = 8, test: int = 4) -> str:
    """The first rows of each split of the sft recipe's Quillmark set: every held-out evaluation of the
    full set (40 questions) is a forward of its own, and those evaluations were most of a smoke test's time."""
    rows = [json.loads(line) for line in open(sft.DATA)]
    few = [r for r in rows if r["split"] == "train"][:train] + [r for r in rows if r["split"] == "test"][:test]
    path = tmp_path / "few_facts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in few))
    return str(path)


def _metrics(log_dir) -> list[dict]:
    rows = [json.loads(line) for line in (log_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows, "no metrics written"
    for row in rows:
        for key, value in row.items():
            assert math.isfinite(value), (key, row)
    return rows


def test_sft_smoke(server, tmp_path):
    config = sft.Config(base_url=server.url, log_dir=str(tmp_path), data=_few_facts(tmp_path), max_steps=2,
                        batch_size=2, eval_every=1, num_examples=1, recall=False)
    summary = sft.main(config)
    rows = _metrics(tmp_path)
    assert rows[-1]["step"] == 2 and "test_nll" in rows[-1]
    assert math.isfinite(summary["test_nll_after"])


def test_rl_math_smoke(server, tmp_path):
    config = rl_math.Config(base_url=server.url, log_dir=str(tmp_path), steps=1, problems_per_step=2, group_size=2,
                            max_tokens=8, num_eval=2, eval_samples=1)
    rl_math.main(config)
    rows = _metrics(tmp_path)
    assert "eval_greedy_acc" in rows[0] and "train_reward" in rows[-1]


def test_dpo_smoke(server, tmp_path):
    config = dpo.Config(base_url=server.url, log_dir=str(tmp_path), num_train=4, num_test=2, batch_size=2,
                        max_steps=1, num_examples=0)
    summary = dpo.main(config)
    rows = _metrics(tmp_path)
    assert rows[0]["test_margin"] == pytest.approx(0.0, abs=1e-3)  # a fresh adapter is the reference
    assert "train_dpo_loss" in rows[-1] and summary["after"]["test_pref_acc"] >= 0


def test_distill_smoke(server, tmp_path):
    config = distill.Config(base_url=server.url, log_dir=str(tmp_path), steps=1, questions_per_step=2,
                            samples_per_question=2, max_tokens=8, num_test=2, eval_samples=1)
    summary = distill.main(config)
    _metrics(tmp_path)
    assert summary["before"]["test_reverse_kl"] > -1  # an estimate: may dip below 0 on tiny samples


def test_continual_smoke(server, tmp_path):
    config = continual.Config(base_url=server.url, log_dir=str(tmp_path), data=_few_facts(tmp_path), max_steps=1,
                              batch_size=4, recall=False)
    summary = continual.main(config)
    rows = _metrics(tmp_path)
    assert {"sequential_a_test_nll", "replay_a_test_nll"} <= set(rows[-1])
    assert math.isfinite(summary["after_task_b_replay"]["a_test_nll"])


def test_ppo_value_smoke(server, tmp_path):
    config = ppo_value.Config(base_url=server.url, log_dir=str(tmp_path), steps=1, batch_size=4, max_tokens=8,
                              num_eval=2, eval_every=1, critic_warmup=1)
    summary = ppo_value.main(config)
    rows = _metrics(tmp_path)
    assert "critic_explained_var" in rows[0] and {"test_greedy_critic", "test_reward_nobaseline"} <= set(rows[1])
    assert {"adv_var_critic", "adv_var_nobaseline", "critic_explained_var", "value_loss"} <= set(rows[-1])
    assert set(summary["after"]) == {"test_reward_critic", "test_reward_nobaseline", "test_greedy_critic",
                                     "test_greedy_nobaseline"}
    assert (tmp_path / "ppo_value.png").exists()


def test_gae_reduces_to_reward_minus_value():
    values = ppo_value.np.array([0.2, 0.5, 0.9])
    assert ppo_value.gae(values, 1.0, lam=1.0) == pytest.approx([0.8, 0.5, 0.1])
    assert ppo_value.gae(values, 1.0, lam=0.0) == pytest.approx([0.3, 0.4, 0.1])  # one-step TD errors


def test_selfplay_smoke(server, tmp_path):
    config = selfplay.Config(base_url=server.url, log_dir=str(tmp_path), steps=1, games_per_step=4, num_eval=4,
                             min_pile=2, max_pile=5, opponent_every=1)
    summary = selfplay.main(config)
    rows = _metrics(tmp_path)
    assert {"eval_win_vs_random_t0", "eval_win_vs_random_t1"} <= set(rows[0])
    assert "train_win_vs_snapshot" in rows[-1]
    assert summary["reference_vs_random"]["optimal"] >= summary["reference_vs_random"]["random"]


def test_selfplay_rules():
    rng = selfplay.random.Random(0)
    games = selfplay.play(None, (selfplay.optimal_move, selfplay.random_move),
                          [selfplay.Game(pile, 0) for pile in (5, 6, 7, 9)], 1.0, rng)
    assert all(g.winner == 0 for g in games)  # the first mover wins every pile that is not a multiple of 4


def test_chat_pipeline_smoke_and_chat(server, tmp_path):
    config = chat_pipeline.Config(base_url=server.url, log_dir=str(tmp_path), sft_steps=1, sft_batch_size=2,
                                  rl_steps=1, rl_problems_per_step=1, rl_group_size=2, max_tokens=8, num_eval=2)
    summary = chat_pipeline.main(config)
    rows = _metrics(tmp_path)
    assert "sft_train_nll" in rows[1] and "rl_train_reward" in rows[-2]
    assert summary["checkpoint"].startswith("tinker://") and summary["checkpoint"] != summary["sft_checkpoint"]
    # The REPL reads stdin until EOF and answers each line in one conversation; checkpoint from summary.json.
    chat = subprocess.run([sys.executable, "-m", "cookbook.chat_pipeline.chat", f"base_url={server.url}",
                           f"log_dir={tmp_path}", "max_tokens=8"], input="Who are you?\n\nWhat is 12 + 30?\n",
                          capture_output=True, text=True, timeout=300)
    assert chat.returncode == 0, chat.stderr
    assert chat.stdout.count("assistant: ") == 2, chat.stdout
    assert summary["checkpoint"] in chat.stderr


def test_key_value_config_parsing():
    config = common.parse_config(dpo.Config, ["beta=0.5", "max_steps=3", "log_dir=none", "base_url=http://x"])
    assert (config.beta, config.max_steps, config.log_dir, config.base_url) == (0.5, 3, None, "http://x")
    with pytest.raises(SystemExit, match="no_such_key"):
        common.parse_config(dpo.Config, ["no_such_key=1"])
