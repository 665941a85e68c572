"""Load on loopback: 8 SDK clients x 64 concurrent requests; no 5xx, no lost future, backpressure works."""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor

import pytest
import tinker
from tinker import types

from tests.e2e.conftest import EMBEDDED, ServerProcess

pytestmark = pytest.mark.slow


def test_eight_clients_with_64_requests_each(tmp_path):
    server = ServerProcess(tmp_path / "load", "--max-pending-samples", "128")  # forces 429 backpressure
    try:
        def client_run(i: int) -> int:
            with tinker.ServiceClient(base_url=server.url, api_key=f"tml-load-{i}") as service:  # closed before stop
                sampler = service.create_sampling_client(base_model=EMBEDDED).result()
                training = service.create_lora_training_client(base_model=EMBEDDED, rank=4, seed=i).result()
                datum = types.Datum(model_input=types.ModelInput.from_ints([1, 2, 3, 4]),
                                    loss_fn_inputs={"target_tokens": [2, 3, 4, 5], "weights": [1.0] * 4})
                futures = [sampler.sample(types.ModelInput.from_ints([10 + i, 20 + j % 7, 30]), 1,
                                          types.SamplingParams(max_tokens=3, seed=j)) for j in range(56)]
                futures += [training.forward([datum], "cross_entropy") for _ in range(8)]
                done = 0
                for future in futures:
                    result = future.result()
                    done += bool(result.sequences[0].tokens) if hasattr(result, "sequences") else \
                        len(result.loss_fn_outputs) == 1
                return done

        with ThreadPoolExecutor(8) as pool:
            assert list(pool.map(client_run, range(8))) == [64] * 8
        log = server.log_path.read_text()
        statuses = re.findall(r"(?:GET|POST) \S+ (\d{3}) ", log)
        assert len(statuses) > 8 * 64
        assert not [s for s in statuses if s.startswith("5")]
        assert "429" in statuses  # the queue filled up, the SDK backed off, and nothing was lost
    finally:
        server.stop()
