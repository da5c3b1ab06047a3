# The two commands of the README: `make demo` and `make test`. Both install into .venv/ first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# CUDA machines keep their own torch; everywhere else pin the local CPU build.
EXTRAS := $(shell nvidia-smi >/dev/null 2>&1 && echo test || echo cpu,test)

.PHONY: install demo test clean

install: $(STAMP)

$(STAMP): setup.py
	command -v bwrap >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[$(EXTRAS)]"
	touch $(STAMP)

# The tiny distillation (4 epochs, TP1/EP2 on 2 gloo processes), then the entropy selection.
demo: install
	OMP_NUM_THREADS=1 $(VENV)/bin/megatron-ring distill recipes/tiny/distill.yaml --run-dir runs/demo
	OMP_NUM_THREADS=1 $(VENV)/bin/megatron-ring select runs/demo

test: install
	OMP_NUM_THREADS=1 $(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) runs .pytest_cache
