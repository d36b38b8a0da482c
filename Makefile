# Two entry points that work from a fresh clone: `make demo` and `make test`.
# Each creates .venv and installs the project (editable, every role's extras and the dev tools)
# on first use. `make test` runs the fast suite; `make test-slow` the named slow set CI runs too
# (tests marked ci_slow: federated training on loopback, the benchmarks' quick modes, the full
# CLI loop, DP training audited from the CLI, the summary migration, the bare registry install);
# `pytest -m slow` runs every slow test.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export PYTHONUNBUFFERED := 1

.PHONY: demo test test-slow bench-base base-card install clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[all,dev]"
	touch $@

install: $(BIN)/.installed

demo: $(BIN)/.installed
	$(BIN)/python examples/demo.py

test: $(BIN)/.installed
	$(BIN)/pytest

# pytest exits 5 when nothing is selected: an empty set is not a failure.
test-slow: $(BIN)/.installed
	$(BIN)/pytest -m ci_slow; rc=$$?; [ $$rc -eq 0 ] || [ $$rc -eq 5 ]

bench-base: $(BIN)/.installed
	$(BIN)/python benchmarks/base_eval.py

# The card of the bundled base (registry/base_cards/), regenerated whenever its weights change.
base-card: $(BIN)/.installed
	$(BIN)/semla-node base-card --out registry/base_cards/semla-tiny.json

clean:
	rm -rf $(VENV) demo-out
