# Every target that runs something installs first when needed, so each one
# works as the first command on a fresh clone.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test test-oldest lint demo bench clean

install: $(STAMP)

$(STAMP): pyproject.toml stpd/_tlsio.c stpd/_plaintar.c
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/pytest -q

# The suite against the lowest dependency versions pyproject.toml allows, in
# a venv of its own (not part of `make test`: it installs from PyPI anew).
OLDEST := .venv-oldest
test-oldest:
	rm -rf $(OLDEST)
	$(PYTHON) -m venv $(OLDEST)
	$(OLDEST)/bin/pip install --quiet --upgrade pip
	$(OLDEST)/bin/pip install --quiet $$($(PYTHON) .ci/oldest_versions.py)
	$(OLDEST)/bin/pip install --quiet -e '.[dev]'
	$(OLDEST)/bin/pip list 2>/dev/null | grep -i -E '^(trio|h11|cryptography|pyopenssl|rich) '
	$(OLDEST)/bin/pytest -q -p no:cacheprovider

lint: $(STAMP)
	$(BIN)/ruff check pki stpd sbc tests bench
	$(BIN)/ruff format --check pki stpd sbc tests bench
	$(BIN)/mypy

demo: $(STAMP)
	$(BIN)/python -m bench.demo

bench: $(STAMP)
	$(BIN)/python -m bench.run

clean:
	rm -rf $(VENV) $(OLDEST) .pytest_cache .mypy_cache .ruff_cache bench/results.json
