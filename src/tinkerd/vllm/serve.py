"""What `tinkerd serve --sampler vllm` builds: a publishing trainer and a `VllmSampler`.

The trainer is wrapped so that `save_weights_for_sampler` publishes `DATA_DIR/adapters/<model_id>/
v<version>/` (see `engine.adapter_publish`), and the sampler loads those folders into the vLLM
server at `url`. A quick `GET /v1/models` at start only warns: vLLM may come up after tinkerd,
and sampling requests answer a clear `server` error until it does.
"""

from __future__ import annotations

import logging
from pathlib import Path

import httpx

from tinkerd.engine.adapter_publish import AdapterVersions, PublishingTrainer, published_root
from tinkerd.engine.interface import Trainer
from tinkerd.vllm.sampler import VllmSampler

log = logging.getLogger(__name__)


def vllm_engine(trainer: Trainer, base_model: str, data_dir: Path, url: str, vllm_model: str | None = None,
                keep_versions: int = 8) -> tuple[PublishingTrainer, VllmSampler]:
    """`base_model`: the one base model tinkerd trains; `vllm_model`: vLLM's name for it (default the same)."""
    served = vllm_model or base_model
    versions = AdapterVersions(published_root(data_dir), keep=keep_versions)
    _check(url, served)
    return PublishingTrainer(trainer, versions), VllmSampler(url, {base_model: served}, versions)


def _check(url: str, served: str) -> None:
    try:
        response = httpx.get(f"{url.rstrip('/')}/v1/models", timeout=5.0)
        response.raise_for_status()
        names = [card.get("id") for card in response.json().get("data", [])]
    except (httpx.HTTPError, ValueError, AttributeError) as exc:
        log.warning("vLLM at %s is not answering yet (%s); sampling fails with a server error until it does", url, exc)
        return
    if served not in names:
        log.warning("vLLM at %s serves %s, not %r: pass --vllm-model with vLLM's --served-model-name", url, names,
                    served)
    else:
        log.info("sampling through vLLM at %s (base model %r)", url, served)
