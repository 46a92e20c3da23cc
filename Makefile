# Two commands for a newcomer: `make demo` (set up + the main job) and `make test` (set up + the tests).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The reference environment: the CPU builds of torch and FBGEMM, then the exact versions of
# requirements-lock.txt, all without dependency resolution (TorchRec's metadata requires the CUDA
# fbgemm-gpu; on CPU we run fbgemm-gpu-cpu). pyproject.toml only states compatible ranges.
LOCK := requirements-lock.txt
STAMP := $(VENV)/.installed

.PHONY: install test demo lint clean

install: $(STAMP)

$(STAMP): pyproject.toml $(LOCK) Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet --no-deps torch==2.13.0 fbgemm-gpu-cpu==1.8.0
	$(PIP) install --quiet --no-deps -r $(LOCK)
	$(PIP) install --quiet --no-deps -e .
	$(PIP) check || true  # reports TorchRec's fbgemm-gpu requirement, met here by fbgemm-gpu-cpu
	$(PY) -c "import torchrec, fbgemm_gpu, embtable; print('embtable installed: torch', __import__('torch').__version__, 'torchrec', torchrec.__version__)"
	touch $(STAMP)

# two pytest-xdist workers (a CI machine has 2 cores); tests sharing a module fixture stay on one (conftest.py)
test: install
	$(PY) -m pytest -q -n 2 --dist loadgroup tests embtable data_prep experiments README.md --ignore=experiments/benchmarks

demo: install
	$(PY) -m experiments.cli demo

lint: install
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info
