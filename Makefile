# Thin wrapper over `python -m pipeline`; every target takes CONFIG=configs/<name>.yaml.
SHELL := /bin/bash
PYTHON_BOOT ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
CONFIG ?= configs/demo.yaml
EXPERT ?= 0
SET ?=
LAUNCHER ?= local
NPROC ?= 1
STAMP := $(VENV)/.installed
CLI := $(PY) -m pipeline
ARGS = --config $(CONFIG) --launcher $(LAUNCHER) $(foreach s,$(SET),--set $(s))

.PHONY: help setup demo test test-fast prep embed cluster assign train ensemble ssl linear-eval linear-probe run status bench lint clean-demo

help:  ## list targets
	@echo "MoDE data-expert pipeline. Targets (CONFIG=$(CONFIG)):"
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | awk -F'\t' '{printf "  make %-12s %s\n", $$1, $$2}'
	@echo "Variables: CONFIG=configs/<name>.yaml  EXPERT=<k>|seed|all  SET='a.b=c ...'  LAUNCHER=local|slurm  NPROC=<gpus>"

$(STAMP): requirements.txt pyproject.toml
	@test -x $(PY) || $(PYTHON_BOOT) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	@touch $(STAMP)

setup: $(STAMP)  ## create the virtual environment (idempotent)

demo: $(STAMP)  ## generate the demo data and run the whole chain on it
	$(CLI) demo-data $(ARGS)
	$(CLI) run $(ARGS)
	@echo "report: runs/$$($(PY) -c 'from pipeline.config import load_config; print(load_config("$(CONFIG)").run.name)')/ensemble/report.md"

test: $(STAMP)  ## run the test suite (unit + integration, CPU)
	$(PY) -m pytest -q tests

test-fast: $(STAMP)  ## unit tests only
	$(PY) -m pytest -q tests/unit

prep: $(STAMP)  ## captions + pair ids → Parquet
	$(CLI) prep $(ARGS)

embed: $(STAMP)  ## caption features
	$(CLI) embed $(ARGS)

cluster: $(STAMP)  ## fine + coarse clustering, then assignment of every pair (slurm: cluster only)
	$(CLI) cluster $(ARGS)
ifneq ($(LAUNCHER),slurm)
	$(CLI) assign $(ARGS)
endif

assign: $(STAMP)  ## assignment only
	$(CLI) assign $(ARGS)

train: $(STAMP)  ## train EXPERT=<k>|seed|all (NPROC>1 uses torchrun)
ifeq ($(NPROC),1)
	$(CLI) train $(ARGS) --expert $(EXPERT)
else
	$(VENV)/bin/torchrun --nproc_per_node=$(NPROC) -m training.main --config $(CONFIG) --expert $(EXPERT) $(foreach s,$(SET),--set $(s))
endif

ensemble: $(STAMP)  ## evaluate experts, route, write the report
	$(CLI) ensemble $(ARGS)

ssl: $(STAMP)  ## self-supervised SogCLR/SimCLR image training (CONFIG=configs/demo_sogclr.yaml; NPROC>1 uses torchrun)
ifeq ($(NPROC),1)
	$(CLI) ssl $(ARGS)
else
	$(VENV)/bin/torchrun --nproc_per_node=$(NPROC) -m training.ssl.main --config $(CONFIG) $(foreach s,$(SET),--set $(s))
endif

linear-eval: $(STAMP)  ## linear evaluation of SSL backbones on cached features (RUNS='sogclr simclr random')
	$(CLI) linear-eval $(ARGS) $(if $(RUNS),--runs $(RUNS))

linear-probe: $(STAMP)  ## linear probe of the experts' concatenated features vs the dense model
	$(CLI) linear-probe $(ARGS)

run: $(STAMP)  ## every stage in order, skipping finished work
	$(CLI) run $(ARGS)

status: $(STAMP)  ## what is done, counts, what is stale
	$(CLI) status --config $(CONFIG)

bench: $(STAMP)  ## benchmarks (speed figures; not tests)
	$(PY) benchmarks/run_all.py --config $(CONFIG)

lint: $(STAMP)  ## ruff
	$(PY) -m ruff check .

clean-demo:  ## remove the demo data and run
	rm -rf data/demo runs/demo
