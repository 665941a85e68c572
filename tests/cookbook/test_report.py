"""cookbook.report: a row per recipe from its run folder, old rows kept for recipes without a run."""

import json

from cookbook import report


def test_rows_come_from_summaries_with_non_default_arguments_and_wall_clock(tmp_path):
    run = tmp_path / "dpo"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"base_url": "http://x", "log_dir": "elsewhere", "beta": 0.25,
                                                 "learning_rate": 2e-4}))
    (run / "summary.json").write_text(json.dumps({"before": {"test_pref_acc": 0.0}, "after": {"test_pref_acc": 0.9375}}))
    (run / "metrics.jsonl").write_text('{"step": 1, "elapsed_s": 30.0}\n{"step": 2, "elapsed_s": 150.0}\n')
    old_sft = "| [`sft`](sft/) | kept | as it was | `cmd` | 1 min |"
    lines = report.table(tmp_path, {"sft": old_sft})
    assert lines[0] == report.HEADER and len(lines) == 2 + len(report.RECIPES)
    dpo = next(line for line in lines if line.startswith("| [`dpo`]"))
    assert "0 % -> 93.8 %" in dpo
    assert "`python -m cookbook.dpo.train beta=0.25` | 2.5 min |" in dpo  # base_url/log_dir are not arguments
    assert old_sft in lines
    assert "(not run yet)" in next(line for line in lines if line.startswith("| [`selfplay`]"))
