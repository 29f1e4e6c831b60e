# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv demo test clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# the CPU build of torch from the local wheel (a plain `torch` pulls a CUDA build)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

# InfoCNF on scikit-learn's digits (real data shipped with a dependency), shortened to 150 of the
# recipe's 400 iterations, one torch thread (robust when other jobs share the cores): measured 343 s
demo: $(STAMP)
	$(BIN)/fastcnf train digits-infocnf --set train.iterations=150 --set threads=1 --out runs/demo --force

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs
