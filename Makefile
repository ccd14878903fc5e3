# The two commands a newcomer runs (see README): `make demo` and `make test`.
.PHONY: setup lint test test-fast demo
VENV := .venv/bin

setup:
	bash scripts/setup.sh

test: setup lint
	$(VENV)/python -m pytest -q -ra

lint: setup  # the package's style: ruff's linter and formatter, configured in pyproject.toml
	$(VENV)/ruff check lorakit
	$(VENV)/ruff format --check lorakit

test-fast: setup
	$(VENV)/python -m pytest -q -ra -m "not slow and not default_model"

demo: setup
	$(VENV)/lorakit demo
