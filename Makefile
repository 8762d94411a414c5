# The two commands: `make run` (whole pipeline, quick profile) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PROFILE ?= quick

.PHONY: install run test clean-runs

install: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml scripts/install.sh
	bash scripts/install.sh $(VENV)
	touch $(STAMP)

run: install
	$(PY) -m ironman_nb run --profile $(PROFILE)

test: install
	$(PY) -m pytest -q tests

clean-runs:
	rm -rf runs
