# gradlab: `make repro` runs the DVC pipeline, `make test` the tests. Both install first if needed.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
# pip extras; CI: dev,lightning,hf (the own-loop integrations' tests skip without them)
EXTRAS ?= dev
export MLFLOW_DISABLE_TELEMETRY ?= true
export DVC_NO_ANALYTICS ?= 1

.PHONY: install install-cluster repro test test-slow test-cluster server server-stop ui bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1
	$(PIP) install -q -e '.[$(EXTRAS)]'
	touch $(STAMP)

install: $(STAMP)

# the scale-out engines (psycopg for PostgreSQL, submitit); PostgreSQL itself: apt-get install postgresql
CLUSTER_STAMP := $(VENV)/.installed-cluster
$(CLUSTER_STAMP): $(STAMP)
	$(PIP) install -q -e '.[dev,cluster]'
	touch $(CLUSTER_STAMP)

install-cluster: $(CLUSTER_STAMP)

repro: $(STAMP)
	PATH="$(abspath $(VENV))/bin:$$PATH" dvc repro

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

test-cluster: $(CLUSTER_STAMP)   # PostgreSQL + mlflow server, submitit jobs, torchrun (README: Scaling out)
	$(PY) -m pytest -q -rs -m cluster

server: $(CLUSTER_STAMP)   # mlflow server on PostgreSQL in .server/ (then: export MLFLOW_TRACKING_URI=http://127.0.0.1:5000)
	$(PY) -m gradlab.server start --dir .server

server-stop: $(STAMP)
	$(PY) -m gradlab.server stop --dir .server

ui: $(STAMP)
	@echo "MLflow UI: http://127.0.0.1:5000/#/experiments?workflowType=machine_learning (the Model-training view)"
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///mlflow.db

bench: $(STAMP)
	$(PY) benchmarks/suite.py
	$(PY) benchmarks/stabilizer_overhead.py
	$(PY) benchmarks/foresight_overhead.py

clean:
	rm -rf outputs multirun reports metrics models
