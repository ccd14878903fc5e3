# The two commands a newcomer runs (see README): `make demo` and `make test`.
.PHONY: setup lint test test-fast demo reliability
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

# the fault suite (tests/reliability); tests/RELIABILITY.md is rendered from what it recorded
RELIABILITY := build/reliability
reliability: setup
	rm -rf $(RELIABILITY) && mkdir -p $(RELIABILITY)
	LORAKIT_RELIABILITY_RESULTS=$(CURDIR)/$(RELIABILITY)/results.jsonl $(VENV)/python -m pytest \
		tests/reliability -q -ra --junitxml=$(RELIABILITY)/junit.xml; status=$$?; \
	$(VENV)/python tests/reliability/render.py $(RELIABILITY) tests/RELIABILITY.md; exit $$status
