"""The job tests' files: small slices of cookbook/jobs_data's examples (the recipes' own data)."""

from cookbook.jobs_data import RL_GRADER, dpo_rows, jsonl, rl_rows, sft_rows  # noqa: F401
