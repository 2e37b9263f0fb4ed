# make demo: the embedded default run end to end.  make test: lint (ruff) and the test suite.
# make test-fast: the inner-loop subset (tests marked `fast`, about two minutes).
# All three create .venv when needed and install the project into it (torch 2.13.0 is taken first when
# no torch is installed, so pip does not pull a CUDA build where a CPU one is wanted).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast install clean

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m megasimpo demo --out demo_run

test: $(STAMP)
	$(VENV)/bin/ruff check megasimpo tools bench tests examples
	$(PY) -m pytest tests -q --durations=25

test-fast: $(STAMP)
	$(VENV)/bin/ruff check megasimpo tools bench tests examples
	$(PY) -m pytest tests -q -m fast --durations=10

clean:
	rm -rf $(VENV) demo_run .pytest_cache
