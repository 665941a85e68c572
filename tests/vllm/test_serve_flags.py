"""`tinkerd serve --sampler vllm` wiring: flag checks, and what `vllm_engine` builds."""

from __future__ import annotations

import logging

import pytest

from tests.conftest import make_tiny_runtime
from tinkerd.cli import main
from tinkerd.engine.trainer import LocalTrainer
from tinkerd.backends.assemble import vllm_engine


def test_vllm_sampler_needs_a_url_and_one_base_model(tmp_path):
    with pytest.raises(SystemExit, match="--sampler vllm needs --vllm-url"):
        main(["serve", "--sampler", "vllm", "--data-dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="one base model"):
        main(["serve", "--sampler", "vllm", "--vllm-url", "http://x", "--base-model", "a", "--base-model", "b",
              "--data-dir", str(tmp_path)])


def test_vllm_engine_clears_stale_versions_and_checks_the_served_name(tmp_path, fake, caplog):
    stale = tmp_path / "adapters" / "old-run" / "v3"
    stale.mkdir(parents=True)
    (stale / "adapter_config.json").write_text("{}")
    caplog.set_level(logging.INFO, logger="tinkerd.backends.assemble")
    trainer, sampler = vllm_engine(LocalTrainer({"tiny": make_tiny_runtime("tiny")}), "tiny", tmp_path / "adapters", fake.url)
    try:
        assert not (tmp_path / "adapters" / "old-run").exists() and (tmp_path / "adapters").is_dir()
        assert "serves ['tiny-served'], not 'tiny'" in caplog.text  # vLLM's name differs: a warning
        assert sampler.base_models == {"tiny": "tiny"}
    finally:
        sampler.close()
    caplog.clear()
    _, sampler = vllm_engine(trainer.trainer, "tiny", tmp_path / "adapters", fake.url, vllm_model="tiny-served")
    sampler.close()
    assert sampler.base_models == {"tiny": "tiny-served"}
    assert "sampling through vLLM" in caplog.text and "--vllm-model" not in caplog.text
