"""The official tinker-cookbook 0.6.1 recipes run unmodified against tinkerd on the embedded SmolLM2.

Each recipe trains 2 steps from its own CLI (`renderer_name=qwen3_instruct`, tiny batches; guess_number,
by far the slowest, 1); then a second invocation on the same log_path resumes from the checkpoint the
first one left and trains the next step only, not step 0. The server must answer every request without a 5xx and its REST API must show
the training runs and their checkpoints. Settings and per-recipe timings: docs/official-cookbook.md.
"""

from __future__ import annotations

import json

import pytest

from tests.e2e.conftest import EMBEDDED
from tests.official_cookbook.harness import RENDERER, Recipe

pytestmark = pytest.mark.slow

MATH_RL = "tinker_cookbook.recipes.math_rl.train"
RL_REWARD = "env/all/reward/total"
SL_NLL = "train_mean_nll"


def _steps(rows: list[dict]) -> list[int]:
    return [row["step"] for row in rows]


def _assert_rl_steps(recipe: Recipe, steps: list[int]) -> list[dict]:
    rows = recipe.step_rows(RL_REWARD)
    assert _steps(rows) == steps
    for row in rows:
        assert row["env/all/total_episodes"] > 0 and row["grad_norm:mean"] >= 0
        # The learner's logprobs of the sampled tokens match the sampler's (same weights, same model).
        assert row["optim/kl_sample_train_v2"] < 0.05, row
    return rows


def _assert_server_run(rest, checkpoint: dict, lora_rank: int | None = None) -> str:
    """The training run behind a checkpoints.jsonl record exists on the server with both checkpoints."""
    run = rest.get_training_run_by_tinker_path(checkpoint["state_path"]).result()
    assert run.base_model == EMBEDDED and run.is_lora and not run.corrupted
    if lora_rank is not None:
        assert run.lora_rank == lora_rank
    paths = {c.tinker_path for c in rest.list_checkpoints(run.training_run_id).result().checkpoints}
    assert {checkpoint["state_path"], checkpoint["sampler_path"]} <= paths
    assert (run.user_metadata or {}).get("renderer_name") == RENDERER
    return run.training_run_id


def test_math_rl_arithmetic_stable_reinforce_and_resume(cookbook_server, rest, tmp_path):
    """The default loss (stable_reinforce: provenance spans, record_stability_info), then a resume."""
    recipe = Recipe(cookbook_server, MATH_RL, tmp_path / "math_rl", "env=arithmetic", "group_size=2",
                    "groups_per_batch=2", "max_tokens=8", "eval_every=0", "save_every=0", "lora_rank=8")
    recipe.run("max_steps=2")
    _assert_rl_steps(recipe, [0, 1])
    first = recipe.checkpoints()[-1]
    assert first["batch"] == 2
    first_run = _assert_server_run(rest, first, lora_rank=8)

    output = recipe.run("max_steps=3", resume=True)
    assert f"Resumed training from {first['state_path']}" in output
    _assert_rl_steps(recipe, [0, 1, 2])  # the resumed process trained step 2 only
    last = recipe.checkpoints()[-1]
    assert last["batch"] == 3 and last["state_path"] != first["state_path"]
    assert _assert_server_run(rest, last, lora_rank=8) != first_run


def test_math_rl_arithmetic_importance_sampling_and_resume(cookbook_server, rest, tmp_path):
    recipe = Recipe(cookbook_server, MATH_RL, tmp_path / "math_rl_is", "env=arithmetic", "loss_fn=importance_sampling",
                    "group_size=2", "groups_per_batch=2", "max_tokens=8", "eval_every=0", "save_every=0",
                    "lora_rank=8")
    recipe.run("max_steps=2")
    _assert_rl_steps(recipe, [0, 1])
    first = recipe.checkpoints()[-1]
    _assert_server_run(rest, first, lora_rank=8)

    output = recipe.run("max_steps=3", resume=True)
    assert f"Resumed training from {first['state_path']}" in output
    _assert_rl_steps(recipe, [0, 1, 2])


def test_preference_shorter_and_resume(cookbook_server, rest, tmp_path):
    """Pairwise-preference RL; its post-step KL needs the sampler's prompt logprobs."""
    recipe = Recipe(cookbook_server, "tinker_cookbook.recipes.preference.shorter.train", tmp_path / "shorter",
                    "batch_size=2", "group_size=2", "max_tokens=8", "eval_every=0", "learning_rate=1e-4")
    recipe.run("max_steps=2")
    rows = _assert_rl_steps(recipe, [0, 1])
    assert all(abs(row["kl_pre_post_v1"]) < 1.0 for row in rows)
    first = recipe.checkpoints()[-1]
    _assert_server_run(rest, first)

    output = recipe.run("max_steps=3", resume=True)
    assert f"Resumed training from {first['state_path']}" in output
    _assert_rl_steps(recipe, [0, 1, 2])
    _assert_server_run(rest, recipe.checkpoints()[-1])


def test_multiplayer_guess_number_and_resume(cookbook_server, rest, tmp_path):
    """Ten-turn episodes: ten sequential sampling rounds and 20 datums per step even at batch 1 (the
    recipe's `player` history role never extends the `assistant` prompt, so turns do not merge).
    The slowest recipe by far (a step is ~270-token prompts x 20 turns, then 20 datums of rank-32
    training), so it trains one step, then resumes and trains step 1, with 4-token replies."""
    recipe = Recipe(cookbook_server, "tinker_cookbook.recipes.multiplayer_rl.guess_number.train",
                    tmp_path / "guess_number", "group_size=2", "batch_size=1", "max_tokens=4", "eval_every=0",
                    "save_every=0", "learning_rate=1e-4")
    recipe.run("max_steps=1", timeout=600)
    rows = _assert_rl_steps(recipe, [0])
    assert all(row["env/all/turns_per_episode"] >= 1 for row in rows)
    first = recipe.checkpoints()[-1]
    assert first["batch"] == 1
    _assert_server_run(rest, first)

    output = recipe.run("max_steps=2", resume=True, timeout=600)
    assert f"Resumed training from {first['state_path']}" in output
    _assert_rl_steps(recipe, [0, 1])  # the resumed process trained step 1 only
    last = recipe.checkpoints()[-1]
    assert last["batch"] == 2 and last["state_path"] != first["state_path"]
    _assert_server_run(rest, last)


def test_chat_sl_bundled_conversations_and_crash_resume(cookbook_server, rest, tmp_path, example_conversations):
    """chat_sl on example_data/conversations.jsonl. The supervised trainer marks a finished run complete
    in its final checkpoint, so its resume is for interrupted runs: the first process is SIGKILLed once
    its step-2 checkpoint is recorded, and the second continues from that checkpoint at step 2."""
    recipe = Recipe(cookbook_server, "tinker_cookbook.recipes.chat_sl.train", tmp_path / "chat_sl",
                    f"dataset={example_conversations}", "batch_size=4", "max_length=512", "eval_every=0",
                    "save_every=2", "learning_rate=1e-4", "lora_rank=8")
    recipe.run_until_checkpoint(2, "max_steps=30")
    crashed = recipe.checkpoints()
    assert [c["batch"] for c in crashed] == [2] and all(c.get("name") != "final" for c in crashed)
    assert _steps(recipe.step_rows(SL_NLL))[:2] == [0, 1]

    output = recipe.run("max_steps=3", resume=True)
    assert f"Resumed training from {crashed[0]['state_path']}" in output
    rows = recipe.step_rows(SL_NLL)
    assert _steps(rows) == [0, 1, 2]  # rows the killed process logged past its checkpoint were dropped
    assert all(row[SL_NLL] > 0 and row["num_loss_tokens"] > 0 for row in rows)
    final = recipe.checkpoints()[-1]
    assert final["name"] == "final"
    _assert_server_run(rest, final, lora_rank=8)


def test_prompt_distillation_train_and_resume(cookbook_server, rest, tmp_path):
    """The train step of prompt_distillation on a JSONL of (prompt, label) chats: one epoch is 2 steps,
    and the resume extends the finished run by a second epoch, starting at step 2."""
    data = tmp_path / "distilled.jsonl"
    pairs = [("Bonjour tout le monde", "fr"), ("Hello there, how are you?", "en"), ("Hola, ¿cómo estás?", "es"),
             ("Guten Morgen und danke", "de")]
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": text},
                                                     {"role": "assistant", "content": label}]}) + "\n"
                            for text, label in pairs))
    recipe = Recipe(cookbook_server, "tinker_cookbook.recipes.prompt_distillation.train", tmp_path / "pd",
                    f"file_path={data}", "batch_size=2", "max_length=256", "eval_every=0", "save_every=0",
                    "learning_rate=1e-4", "lora_rank=8")
    recipe.run("num_epochs=1")
    assert _steps(recipe.step_rows(SL_NLL)) == [0, 1]
    first = recipe.checkpoints()[-1]
    assert (first["name"], first["epoch"]) == ("final", 1)
    _assert_server_run(rest, first, lora_rank=8)

    output = recipe.run("num_epochs=2", "max_steps=3", resume=True)
    assert f"Resumed training from {first['state_path']}" in output
    rows = recipe.step_rows(SL_NLL)
    assert _steps(rows) == [0, 1, 2] and rows[-1]["epoch"] == 1
    assert all(row[SL_NLL] > 0 for row in rows)
    _assert_server_run(rest, recipe.checkpoints()[-1], lora_rank=8)
