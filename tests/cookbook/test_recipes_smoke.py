"""Each cookbook recipe runs end to end with a tiny config and writes finite metrics.

These only prove the recipes run against tinkerd; the learning results are in each recipe's README.
"""

from __future__ import annotations

import json
import math

import pytest

from cookbook import common
from cookbook.continual import train as continual
from cookbook.distill import train as distill
from cookbook.dpo import train as dpo
from cookbook.rl_math import train as rl_math
from cookbook.sft import train as sft

pytestmark = pytest.mark.slow


def _metrics(log_dir) -> list[dict]:
    rows = [json.loads(line) for line in (log_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows, "no metrics written"
    for row in rows:
        for key, value in row.items():
            assert math.isfinite(value), (key, row)
    return rows


def test_sft_smoke(server, tmp_path):
    config = sft.Config(base_url=server.url, log_dir=str(tmp_path), max_steps=2, batch_size=2, eval_every=1,
                        num_examples=1, recall=False)
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
    config = continual.Config(base_url=server.url, log_dir=str(tmp_path), max_steps=1, batch_size=4, recall=False)
    summary = continual.main(config)
    rows = _metrics(tmp_path)
    assert {"sequential_a_test_nll", "replay_a_test_nll"} <= set(rows[-1])
    assert math.isfinite(summary["after_task_b_replay"]["a_test_nll"])


def test_key_value_config_parsing():
    config = common.parse_config(dpo.Config, ["beta=0.5", "max_steps=3", "log_dir=none", "base_url=http://x"])
    assert (config.beta, config.max_steps, config.log_dir, config.base_url) == (0.5, 3, None, "http://x")
    with pytest.raises(SystemExit, match="no_such_key"):
        common.parse_config(dpo.Config, ["no_such_key=1"])
