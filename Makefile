# Two commands for a newcomer: `make demo` (set up + the main job) and `make test` (set up + the tests).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# torchrec's metadata requires the CUDA fbgemm-gpu; we run on the CPU build (fbgemm-gpu-cpu, pinned in
# pyproject.toml), so torchrec itself is installed without its declared dependencies.
TORCHREC := torchrec==1.8.0
STAMP := $(VENV)/.installed

.PHONY: install test demo lint clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.13.0 fbgemm-gpu-cpu==1.8.0
	$(PIP) install --quiet -e '.[test]'
	$(PIP) install --quiet --no-deps $(TORCHREC)
	$(PY) -c "import torchrec, fbgemm_gpu, embtable; print('embtable installed: torch', __import__('torch').__version__, 'torchrec', torchrec.__version__)"
	touch $(STAMP)

test: install
	$(PY) -m pytest -q tests embtable README.md

demo: install
	$(PY) -m experiments.cli demo

lint: install
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info
