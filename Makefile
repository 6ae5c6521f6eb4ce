# The README's two commands: `make demo` and `make test`. Both set up .venv on first use.
VENV ?= .venv
export VENV

.PHONY: setup demo test lint bench clean

setup:
	@bash scripts/setup_venv.sh

demo: setup
	$(VENV)/bin/reled-hpc demo

test: setup
	$(VENV)/bin/python -m pytest -q

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: setup
	$(VENV)/bin/python -m reled_hpc.bench env --map helsinki --agents 100 --steps 600 --json
	$(VENV)/bin/python -m reled_hpc.bench env --map helsinki --agents 1000 --steps 600 --json

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
