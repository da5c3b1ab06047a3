# The two commands of the README: `make demo` and `make test`. Both install into .venv/ first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
RECIPES := $(wildcard recipes/tiny/*.yaml recipes/ling_lite/*.yaml)
# CUDA machines keep their own torch; everywhere else pin the local CPU build.
EXTRAS := $(shell nvidia-smi >/dev/null 2>&1 && echo test || echo cpu,test)

.PHONY: install demo recipes submit docker test test-fast clean

install: $(STAMP)

$(STAMP): setup.py megatron_ring/versions.py
	command -v bwrap >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[$(EXTRAS)]"
	touch $(STAMP)

# The whole tiny recipe on CPU: distill (TP1/EP2 on 2 gloo processes) -> select by entropy ->
# RL math -> RL code + science, then the report and runs/demo/plots/pipeline.png.
demo: install
	OMP_NUM_THREADS=1 $(VENV)/bin/megatron-ring run recipes/tiny/pipeline.yaml --run-dir runs/demo

# Every recipe as SLURM batch scripts under build/slurm/ (each checked with bash -n).
recipes: install
	$(VENV)/bin/megatron-ring slurm $(RECIPES) --out build/slurm
	for f in $$(find build/slurm -name '*.sbatch' -o -name submit.sh); do bash -n $$f || exit 1; done

# make submit RECIPE=recipes/ling_lite/pipeline.yaml [ARGS="key=value ... --run-dir DIR"]
submit: install
	@test -n "$(RECIPE)" || { echo "usage: make submit RECIPE=recipes/... [ARGS=...]"; exit 2; }
	$(VENV)/bin/megatron-ring slurm $(RECIPE) $(ARGS) --out build/slurm --submit

# The GPU image (docker/Dockerfile): its base tag and every pin come from megatron_ring/versions.py.
VERSION := $(shell sed -n 's/^__version__ = "\(.*\)"/\1/p' megatron_ring/__init__.py)
docker:
	docker build --build-arg NGC_TAG=$$($(PYTHON) megatron_ring/versions.py ngc-tag) -f docker/Dockerfile -t megatron-ring:$(VERSION) .

# Everything (what CI runs, .ci/run): end-to-end pipeline, SLURM and docker image tests included.
test: install
	OMP_NUM_THREADS=1 $(PY) -m pytest -q tests

# Unit tests and the 2-process equivalence tests: the tests marked slow (tests/conftest.py) left out.
test-fast: install
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -m "not slow" tests

clean:
	rm -rf $(VENV) runs build .pytest_cache
