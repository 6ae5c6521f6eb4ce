# The README's two commands: `make demo` and `make test`. Both set up .venv on first use; `make test` also
# sets up .venv-vllm (the CPU build of vLLM and its model folder) for tests/test_vllm.py.
VENV ?= .venv
export VENV

.PHONY: setup setup-vllm demo test lint bench clean

setup:
	@bash scripts/setup_venv.sh

setup-vllm: setup
	@bash scripts/setup_vllm.sh

demo: setup
	$(VENV)/bin/reled-hpc demo

test: setup setup-vllm
	$(VENV)/bin/python -m pytest -q

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: setup
	$(VENV)/bin/python -m reled_hpc.bench env --map helsinki --agents 100 --steps 600 --json
	$(VENV)/bin/python -m reled_hpc.bench env --map helsinki --agents 1000 --steps 600 --json

clean:
	rm -rf $(VENV) .venv-vllm .pytest_cache .ruff_cache
