# The two set-up commands of the README: `make smoke` runs jobs/smoke.yaml on the embedded
# default (local backend, local directory store); `make test` runs every test. Both bootstrap first.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: bootstrap smoke test unit

bootstrap:
	@bash scripts/bootstrap.sh

smoke: bootstrap
	$(VENV)/bin/speedrun launch jobs/smoke.yaml

test: bootstrap
	$(PY) -m pytest -q -ra tests

unit: bootstrap
	$(PY) -m pytest -q tests/unit
