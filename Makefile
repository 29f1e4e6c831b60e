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

# Class-conditional flow matching on scikit-learn's digits (real data shipped with a dependency): 1,500
# iterations, one torch thread (robust when other jobs share the cores): measured 2 min 36 s, 1.944 bits/dim,
# 92.5% of class-conditional samples recognised as their label (runs/demo/figures/class_conditional_samples.png)
demo: $(STAMP)
	$(BIN)/fastcnf train digits-fm-conditional --set train.iterations=1500 threads=1 --out runs/demo --force

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs
