# Two commands work on a fresh machine with Python 3.11 and Java:
#   make demo  — create/update .venv, install, run the end-to-end lifecycle on embedded defaults
#   make test  — create/update the same .venv (plus test packages), run the whole suite
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_LOGGING_LEVEL ?= WARNING

.PHONY: demo test venv venv-dev up down serve bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.runtime: requirements.txt | $(BIN)/python
	$(BIN)/pip install --quiet -r requirements.txt
	touch $@

$(VENV)/.dev: requirements-dev.txt $(VENV)/.runtime
	$(BIN)/pip install --quiet -r requirements-dev.txt
	touch $@

venv: $(VENV)/.runtime
venv-dev: $(VENV)/.dev

# STACK=1: run the lifecycle against the stack of `make up` instead of embedded defaults
demo: venv
	$(BIN)/python -m flows.lifecycle $(if $(STACK),--stack)

test: venv-dev
	$(BIN)/python -m pytest -n 2 --dist loadfile $(PYTEST_ARGS)

# PROFILE=production: every store shared by workers on other machines (deployments/up.sh header);
# it also installs the test packages, for moto's S3 server that stands in for MinIO when
# MLOPS_S3_ENDPOINT_URL names none
up: $(if $(filter production,$(PROFILE)),venv-dev,venv)
	$(if $(PROFILE),MLOPS_PROFILE=$(PROFILE)) bash deployments/up.sh

down:
	bash deployments/down.sh

# The REST API alone on embedded defaults (or on the Prefect API your profile names), where the
# APISettings block says (default 127.0.0.1:8000; HOST=/PORT= override): OpenAPI at /docs.
# Create a key first: $(BIN)/python -m api.keys create me --scope admin
serve: venv
	PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=$${PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS:-120} \
	  $(BIN)/python -m api $(if $(HOST),--host $(HOST)) $(if $(PORT),--port $(PORT))

bench: venv-dev
	$(BIN)/python bench/overhead.py

clean:
	rm -rf .mlops
