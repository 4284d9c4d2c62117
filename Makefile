# attnfd-pipeline — `make help` lists the targets. Two commands on a fresh machine: `make demo`, `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
ATTNFD := $(BIN)/attnfd
CONFIG ?= configs/demo.toml
SEED ?= 0
ALPHA ?=
NPROC ?= 1
ALPHAS ?= 0.1,1,2,10
SEEDS ?= 0
# seeds of the rows the accuracy goals compare (student, AttnFD cached and online): with a seed std of
# 1-1.5 mIoU, 3 seeds cannot resolve the 1-point |cached - online| goal (standard error of the difference ~1.1)
BENCH_SEEDS ?= 8
# extra flags of `make bench`, e.g. BENCH_ARGS=--allow-busy (the full bench refuses a load average >= 0.5)
BENCH_ARGS ?=
# Stamps record that a stage ran for a config; a stage reruns when its config or its inputs change.
STAMPS := .make
CFG_NAME := $(basename $(notdir $(CONFIG)))
STUDENT_ARGS := --seed $(SEED) $(if $(ALPHA),--alpha $(ALPHA),)
# NPROC > 1: teacher, cache and student run under torchrun on this node, one process per GPU (DDP with
# NCCL; gloo on CPU); the cache gets one writer per process. NPROC = 1: the plain command.
TORCHRUN := $(BIN)/torchrun --standalone --nproc_per_node=$(NPROC)
MULTI := $(filter-out 0 1,$(NPROC))
RUN_TEACHER := $(if $(MULTI),$(TORCHRUN) -m stages.teacher,$(ATTNFD) teacher)
RUN_CACHE := $(if $(MULTI),$(TORCHRUN) -m stages.cache build,$(ATTNFD) cache build)
RUN_STUDENT := $(if $(MULTI),$(TORCHRUN) -m stages.student,$(ATTNFD) student)

.DEFAULT_GOAL := help
.PHONY: help install demo data teacher cache student baseline results test test-fast clean-runs sweep bench bench-accuracy studies chaos

help: ## Show this help
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  \033[36m%-15s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)
	@echo "  variables: CONFIG=$(CONFIG) SEED=$(SEED) ALPHA=$(ALPHA) NPROC=$(NPROC) BENCH_SEEDS=$(BENCH_SEEDS)"

install: $(VENV)/.installed ## Create .venv and install the package with its test extras

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

data: $(STAMPS)/data-$(CFG_NAME) ## Prepare the config's dataset (generates the embedded demo; checks a real one)

$(STAMPS)/data-$(CFG_NAME): $(CONFIG) | $(VENV)/.installed
	@mkdir -p $(STAMPS)
	$(ATTNFD) data prepare --config $(CONFIG)
	touch $@

teacher: $(STAMPS)/teacher-$(CFG_NAME) ## Stage 1a: train the teacher + CBAMs, freeze into a bundle

$(STAMPS)/teacher-$(CFG_NAME): $(CONFIG) $(STAMPS)/data-$(CFG_NAME)
	$(RUN_TEACHER) --config $(CONFIG) --resume
	touch $@

cache: $(STAMPS)/cache-$(CFG_NAME) ## Stage 1b: write the teacher's CBAM-refined maps to a Zarr v3 cache

$(STAMPS)/cache-$(CFG_NAME): $(CONFIG) $(STAMPS)/teacher-$(CFG_NAME)
	$(RUN_CACHE) --config $(CONFIG)
	touch $@

student: $(STAMPS)/cache-$(CFG_NAME) ## Stage 2: train the student from the cache (ALPHA=, SEED=, NPROC=)
	$(RUN_STUDENT) --config $(CONFIG) $(STUDENT_ARGS)

baseline: $(STAMPS)/data-$(CFG_NAME) ## The student alone (alpha = 0), same crops and schedule
	$(ATTNFD) student --config $(CONFIG) --seed $(SEED) --alpha 0

results: ## Print the result table of the config's runs
	$(ATTNFD) results --config $(CONFIG)

demo: $(STAMPS)/cache-$(CFG_NAME) ## Everything on the embedded dataset: teacher → cache → student (+ baseline), then the table (a rerun reuses finished runs)
	$(ATTNFD) student --config $(CONFIG) --seed $(SEED) --alpha 0 --resume
	$(ATTNFD) student --config $(CONFIG) --seed $(SEED) --resume
	$(ATTNFD) results --config $(CONFIG)

bench: $(STAMPS)/teacher-$(CFG_NAME) ## Measure what caching buys (step time, memory, build/read throughput, storage fidelity on the trained teacher; the feed at the paper's shapes) -> bench/results.{json,md}, bench/storage.{json,md}, bench/feed.{json,md}
	$(ATTNFD) bench --config $(CONFIG) --out bench --wait-quiet 600 $(BENCH_ARGS)
	$(ATTNFD) bench-feed --config configs/voc.toml --out bench

bench-accuracy: $(STAMPS)/cache-$(CFG_NAME) ## Teacher, student, every rival (KD/LAD/AICSD/Af-DCD/CIRKD/DIST), AttnFD (cached + online, float16 vs compact caches) on the config's data, goals checked (resumable) -> bench/accuracy.{json,md}
	$(ATTNFD) bench-accuracy --config $(CONFIG) --seeds $(BENCH_SEEDS) --compact int8 --compact int8+poolD2 --out bench

studies: $(STAMPS)/teacher-$(CFG_NAME) ## Every study of the report on the config's data: K vs online, methods, α, points, norm, teacher CBAM mode (resumable) -> bench/studies/report.md + PNGs
	$(ATTNFD) studies --config $(CONFIG) --out bench/studies
	$(ATTNFD) visualize --config $(CONFIG) --out bench/studies/attention_0.png

test: $(VENV)/.installed ## Run the test suite (everything, as CI does)
	$(BIN)/python -m pytest -q

test-fast: $(VENV)/.installed ## Run the unit tests only (-m "not slow": no multi-step training, subprocess CLI or chaos)
	$(BIN)/python -m pytest -q -m "not slow"

clean-runs: ## Delete runs/, data/demo, cache contents and stamps (asks nothing: be sure)
	rm -rf runs data/demo $(STAMPS) && find cache -mindepth 1 ! -name README.md -exec rm -rf {} +

sweep: $(STAMPS)/cache-$(CFG_NAME) ## α × seed grid on one cache via dask (ALPHAS=0.1,1,2,10 SEEDS=0,1,2)
	$(ATTNFD) sweep --config $(CONFIG) --alpha $(ALPHAS) --seed $(SEEDS)

chaos: $(VENV)/.installed ## SIGKILL `cache build` 20× at random moments, resume, compare bitwise; prints the tally
	$(BIN)/python tests/chaos.py --kills 20
