# The README's two commands: `make serve` and `make test`. Both set up everything from
# nothing: the virtualenv, the package, OpenBLAS on Linux, Redis and nginx (for the tests
# of several servers), the four coding agents at pinned versions (npm, into .cache/agents),
# the two real models and the two LoRA adapters trained on one of them.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
MODELS := models/.fetched
ADAPTERS := adapters/.trained

.PHONY: serve test test-fast lint experiments setup clean-models

serve: setup
	$(VENV)/bin/semantic-server serve

# The fast tier (tests/unit: fakes, in process) runs first; then the real models and
# servers, on two workers (a test file stays on one worker, so its servers start once).
test: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest tests/unit
	$(VENV)/bin/pytest -n 2 --dist loadfile --durations=12 tests/integration tests/e2e

# The fast tier alone: no real model needed, under a minute.
test-fast: $(INSTALLED)
	$(VENV)/bin/pytest tests/unit

lint: $(INSTALLED)
	$(VENV)/bin/ruff check .

setup: $(INSTALLED) $(MODELS) $(ADAPTERS)

$(INSTALLED): pyproject.toml scripts/install_services scripts/install_agents
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	./scripts/install_openblas
	./scripts/install_services
	./scripts/install_agents
	touch $@

$(MODELS): $(INSTALLED) scripts/fetch_models scripts/templates/transcript.jinja src/semantic_server/models/gguf_import.py \
		src/semantic_server/models/gguf_reader.py src/semantic_server/models/gguf_blocks.py
	$(PY) scripts/fetch_models
	touch $@

# Two small LoRA adapters for SmolLM2 (about two minutes on two CPU cores).
$(ADAPTERS): $(MODELS) scripts/train_adapters $(wildcard scripts/adapter_data/*/*.jsonl)
	$(PY) scripts/train_adapters
	touch $@

experiments: setup
	$(PY) -m experiments.exp011_memory_reclamation
	$(PY) -m experiments.exp012_swap_latency
	$(PY) -m experiments.exp013_cache_restore
	$(PY) -m experiments.exp014_agents_round_trip
	$(PY) -m experiments.exp014_agents_round_trip --agents 64
	$(PY) -m experiments.exp015_swap_under_load
	$(PY) -m experiments.exp016_adapter_swap
	$(PY) -m experiments.exp017_models_by_request
	$(PY) -m experiments.exp018_disk_formats
	$(PY) -m experiments.exp018_write_behind
	$(PY) -m experiments.exp018_first_load
	$(PY) -m experiments.exp018_prefix_chunks --gemma-agents 4
	$(PY) -m experiments.exp018_restore_or_recompute
	$(PY) -m experiments.exp019_replicas

clean-models:
	rm -rf models .cache/models
