# The README's two commands: `make reproduce` (set up + main job) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SAMPLE_DATA ?= $(abspath ../shared/data)

.PHONY: setup reproduce test

$(VENV)/.installed: requirements.txt requirements-test.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-test.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

setup: $(VENV)/.installed

# writes results/local/ (ignored by git); the committed results/ stay as they are
reproduce: setup
	$(VENV)/bin/medimaging reproduce

test: setup
	MEDIMAGING_SAMPLE_DATA=$(SAMPLE_DATA) $(PY) -m pytest -q
