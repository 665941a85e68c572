"""`make bench`'s report opens with the performance targets, each met, missed or not measured in that run."""

from bench import run_all


def test_targets_table_says_met_missed_and_not_measured():
    results = [{"bench": "train", "ratio_vs_hf_peft": 1.6}, {"bench": "overhead", "overhead_fraction": 0.2},
               {"bench": "weights_to_sampler", "tinkerd_ms": 150.0}, {"bench": "sample", "error": "exit 1"}]
    rows = {row.split(" | ")[1]: row for row in run_all.target_rows(results)[2:]}
    assert rows["train.ratio_vs_hf_peft"].endswith("| >= 1.5 | 1.6 | yes |\n")
    assert rows["overhead.overhead_fraction"].endswith("| <= 0.1 | 0.2 | no |\n")
    assert rows["weights_to_sampler.tinkerd_ms"].endswith("| <= 200 | 150 | yes |\n")
    assert rows["sample.ratio_b16"].endswith("| - | not measured |\n")
    assert rows["multitenant.tenants8_vs_ideal"].endswith("| - | not measured |\n")


def test_llama_cpp_targets_say_not_measured_for_a_null_figure():
    results = [{"bench": "llama_cpp", "tinkerd_vs_llama_f32_b1": 0.5, "tinkerd_reduced_vs_llama_q8_0_b1": None}]
    rows = {row.split(" | ")[1]: row for row in run_all.target_rows(results)[2:]}
    assert rows["llama_cpp.tinkerd_vs_llama_f32_b1"].endswith("| >= 1 | 0.5 | no |\n")
    assert rows["llama_cpp.tinkerd_reduced_vs_llama_q8_0_b1"].endswith("| - | not measured |\n")
    assert rows["llama_cpp.tinkerd_vs_llama_f32_prefill"].endswith("| - | not measured |\n")
