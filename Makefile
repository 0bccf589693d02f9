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
FORCE ?=
ARGS = --config $(CONFIG) --launcher $(LAUNCHER) $(foreach s,$(SET),--set $(s))
FORCE_ARG = $(if $(FORCE),--force)

.PHONY: help setup demo demo-ablation test test-fast test-slurm prep embed cluster assign add-experts train ensemble ssl linear-eval linear-probe eval run status bench lint clean-demo shard

help:  ## list targets
	@echo "MoDE data-expert pipeline. Targets (CONFIG=$(CONFIG)):"
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | awk -F'\t' '{printf "  make %-14s %s\n", $$1, $$2}'
	@echo "Variables: CONFIG=configs/<name>.yaml  EXPERT=<k>|seed|dense|baselines|all  SET='a.b=c ...'  LAUNCHER=local|slurm  NPROC=<gpus>  FORCE=1 (redo: --force)"

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

demo-ablation: $(STAMP)  ## the demo with every baseline (dense_equal_compute, random_split, full_ensemble)
	$(CLI) demo-data --config configs/demo_ablation.yaml --launcher $(LAUNCHER)
	@if [ -d "$$($(PY) -m training.runs --config configs/demo.yaml dense)" ] && [ ! -d runs/demo_ablation ]; then \
	  echo "reusing runs/demo (same data, seed, experts and dense; a copied run is not stale)"; \
	  cp -r runs/demo runs/demo_ablation && rm -rf runs/demo_ablation/ensemble; fi
	$(CLI) run --config configs/demo_ablation.yaml --launcher $(LAUNCHER) $(foreach s,$(SET),--set $(s))
	@echo "report: runs/demo_ablation/ensemble/report.md"

test: $(STAMP)  ## run the test suite (unit + integration, CPU)
	$(PY) -m pytest -q tests

test-fast: $(STAMP)  ## unit tests only
	$(PY) -m pytest -q tests/unit

test-slurm: $(STAMP)  ## the chain on a real local SLURM cluster (root; apt-installs slurm, munge, MariaDB)
	PY=$(PY) bash tools/test-slurm.sh

prep: $(STAMP)  ## captions + pair ids → Parquet
	$(CLI) prep $(ARGS) $(FORCE_ARG)

embed: $(STAMP)  ## caption features
	$(CLI) embed $(ARGS) $(FORCE_ARG)

cluster: $(STAMP)  ## fine + coarse clustering, then assignment of every pair (slurm: cluster only)
	$(CLI) cluster $(ARGS) $(FORCE_ARG)
ifneq ($(LAUNCHER),slurm)
	$(CLI) assign $(ARGS) $(FORCE_ARG)
endif

assign: $(STAMP)  ## assignment only
	$(CLI) assign $(ARGS) $(FORCE_ARG)

NEW_EXPERTS ?= 1
NEW_FINE ?=

add-experts: $(STAMP)  ## new experts: cluster the grown shards (NEW_EXPERTS=1 NEW_FINE=<k>), then make assign
	$(CLI) add-experts $(ARGS) --num-experts $(NEW_EXPERTS) $(if $(NEW_FINE),--num-fine $(NEW_FINE))

TORCHRUN_ARGS = $(if $(filter-out 1,$(NPROC)),--launcher torchrun --set launcher.nproc_per_node=$(NPROC))

train: $(STAMP)  ## train EXPERT=<k>|seed|experts|dense|random_split|baselines|all (NPROC>1 uses torchrun)
	$(CLI) train $(ARGS) $(TORCHRUN_ARGS) --expert $(EXPERT) $(FORCE_ARG)

ensemble: $(STAMP)  ## evaluate experts, route, write the report
	$(CLI) ensemble $(ARGS) $(FORCE_ARG)

ssl: $(STAMP)  ## self-supervised SogCLR/SimCLR image training (CONFIG=configs/demo_sogclr.yaml; NPROC>1 uses torchrun)
	$(CLI) ssl $(ARGS) $(TORCHRUN_ARGS)

linear-eval: $(STAMP)  ## linear evaluation of SSL backbones on cached features (RUNS='sogclr simclr random')
	$(CLI) linear-eval $(ARGS) $(if $(RUNS),--runs $(RUNS))

linear-probe: $(STAMP)  ## linear probe of the experts' concatenated features vs the dense model
	$(CLI) linear-probe $(ARGS)

eval: $(STAMP)  ## score MODEL=<open_clip name> [PRETRAINED=<ckpt>] or RUN=<run dir> on TASKS='<folders>' (JSON; OUTPUT=<file>)
	$(CLI) eval --config $(CONFIG) $(foreach s,$(SET),--set $(s)) $(if $(RUN),--run $(RUN),--model $(or $(MODEL),$(error make eval: set MODEL=<open_clip name> [PRETRAINED=<ckpt>] or RUN=<run dir>))) $(if $(PRETRAINED),--pretrained $(PRETRAINED)) $(if $(TASKS),--tasks $(TASKS)) $(if $(OUTPUT),--output $(OUTPUT))

run: $(STAMP)  ## every stage in order, skipping finished work
	$(CLI) run $(ARGS) $(FORCE_ARG)

status: $(STAMP)  ## what is done, counts, what is stale
	$(CLI) status --config $(CONFIG) $(foreach s,$(SET),--set $(s))

shard: $(STAMP)  ## convert IN=<csv|folder> into webdataset tars in OUT=<dir> (MAX_MB=1000 MAX_COUNT=10000)
	$(CLI) shard --config $(CONFIG) --input $(IN) --out $(OUT) --max-size-mb $(or $(MAX_MB),1000) --max-count $(or $(MAX_COUNT),10000) $(FORCE_ARG)

bench: $(STAMP)  ## benchmarks (speed figures; not tests)
	$(PY) -m benchmarks.run_all --config $(CONFIG)
	$(PY) -m benchmarks.make_docs

lint: $(STAMP)  ## ruff
	$(PY) -m ruff check .

clean-demo:  ## remove the demo data and run
	rm -rf data/demo runs/demo runs/demo_ablation

.PHONY: bench-gpu bench-docs
bench-gpu: $(STAMP)  ## GPU checks: tests marked gpu, then benchmarks.gpu_check (QUICK=1: smaller), docs
	$(PY) -m pytest -q -m gpu tests; rc=$$?; [ $$rc -eq 0 ] || [ $$rc -eq 5 ]
	$(PY) -m benchmarks.gpu_check $(if $(QUICK),--quick)
	$(PY) -m benchmarks.make_docs

bench-docs: $(STAMP)  ## regenerate docs/benchmarks.md from benchmarks/results.jsonl
	$(PY) -m benchmarks.make_docs
