# make demo: train on the bundled sketches and write a submission.  make test: lint and the test suite.
# Both create the virtual environment .venv on first use (PYTHON picks the interpreter, 3.11 or newer).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test lint install clean

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt -r requirements-dev.txt
	touch $@

demo: install
	$(PY) main.py --test_solution data/tuberlin10/test_solution.csv

lint: install
	$(PY) -m ruff check .

test: lint
	$(PY) -m pytest -q

clean:
	rm -rf runs outputs .pytest_cache .ruff_cache
