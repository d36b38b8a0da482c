# Two entry points that work from a fresh clone: `make demo` and `make test`.
# Each creates .venv and installs the project (editable, with the dev extras) on first use.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export PYTHONUNBUFFERED := 1

.PHONY: demo test bench-base base-card install clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

install: $(BIN)/.installed

demo: $(BIN)/.installed
	$(BIN)/python examples/demo.py

test: $(BIN)/.installed
	$(BIN)/pytest

bench-base: $(BIN)/.installed
	$(BIN)/python benchmarks/base_eval.py

# The card of the bundled base (registry/base_cards/), regenerated whenever its weights change.
base-card: $(BIN)/.installed
	$(BIN)/semla-node base-card --out registry/base_cards/semla-tiny.json

clean:
	rm -rf $(VENV) demo-out
