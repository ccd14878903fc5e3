# The two commands a newcomer runs (see README): `make demo` and `make test`.
.PHONY: setup test test-fast demo
VENV := .venv/bin

setup:
	bash scripts/setup.sh

test: setup
	$(VENV)/python -m pytest -q -ra

test-fast: setup
	$(VENV)/python -m pytest -q -ra -m "not slow and not default_model"

demo: setup
	$(VENV)/lorakit demo
