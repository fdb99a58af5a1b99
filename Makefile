# Three-stage RLHF pipeline. Run `make sft rm ppo` for the default tiny pipeline on the CPU,
# `make test` for the test suite. Every target sets up .venv on first use.
#   make sft PIPELINE=pipelines/other.yaml SET="sft.epochs=1 sft.learning_rate=1e-4" FORCE=1 RUN=my-run
#   FORCE=1 trains even when an entry is up to date, and a rerun of the same command resumes it; RESTART=1 starts over
#   make compare, make plot: stage metrics per pipeline run, as a table and as curves

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# A CPU box installs the CPU build of torch that lies on disk; a GPU box may pin its own CUDA build.
TORCH_SPEC ?= torch==2.13.0
PIPELINE ?= pipelines/tiny.yaml
SET ?=
FORCE ?=
RESTART ?=
# One pipeline-run tag for every stage of one make invocation (wandb group <pipeline>-<tag>); RUN=name sets it.
RUN ?=
RUN_TAG := $(or $(RUN),$(shell date -u +%Y%m%d-%H%M%S))
# Processes per machine under the pipeline's accelerate_config (NPROC=2); unset: its `processes`, else one per GPU.
NPROC ?=
STAGE_ARGS = --pipeline $(PIPELINE) --run $(RUN_TAG) $(if $(FORCE),--force) $(if $(RESTART),--restart) $(if $(NPROC),--nproc $(NPROC)) $(SET)
# Iterated rounds: ROUND=2 for rm, ppo and collect; LABELS=file for collect with your own labels; N for rounds.
ROUND ?=
LABELS ?=
N ?= 1
ROUND_ARGS = $(if $(ROUND),--round $(ROUND))
BENCH_ARGS ?=
COMPARE_ARGS ?=

.PHONY: setup sft rm ppo dpo plan collect rounds test test-fast lint chaos bench algorithms registry compare plot tasks clean-runs

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

sft: setup
	$(BIN)/rlhf sft $(STAGE_ARGS)

rm: setup
	$(BIN)/rlhf rm $(STAGE_ARGS) $(ROUND_ARGS)

ppo: setup
	$(BIN)/rlhf ppo $(STAGE_ARGS) $(ROUND_ARGS)

# DPO beside PPO: on the rm section's comparisons from the SFT policy, evaluated as PPO is (docs/dpo.md).
dpo: setup
	$(BIN)/rlhf dpo $(STAGE_ARGS)

# New comparisons on the newest policy, for the next round (or ROUND=R); LABELS=file with labeller: file.
collect: setup
	$(BIN)/rlhf collect $(STAGE_ARGS) $(ROUND_ARGS) $(if $(LABELS),--labels $(LABELS))

# collect -> rm -> ppo, N times.
rounds: setup
	$(BIN)/rlhf rounds $(STAGE_ARGS) --count $(N)

# Our PPO against TRL 1.12's (installed by the benchmark in .bench/trl-1.12, not a dependency);
# ALGO=grpo or ALGO=rloo: ours against TRL 1.16's GRPOTrainer / RLOOTrainer (our own dependency).
ALGO ?= ppo
bench: setup
	$(BIN)/python bench/run.py --pipeline $(PIPELINE) --algo $(ALGO) $(BENCH_ARGS)

# PPO, GRPO, RLOO, REINFORCE++ and DPO from the same SFT and RM per seed, at equal episodes and equal wall time:
# medians over seeds, one table and the curves in runs/algorithms/ (docs/stages.md), e.g.
# ALGOS_ARGS="--seeds 1,2,3 --threads 1 --force".
ALGOS_ARGS ?=
algorithms: setup
	$(BIN)/python bench/algorithms.py --pipeline $(PIPELINE) $(ALGOS_ARGS)

# What `make sft rm ppo` would do: each stage up to date, resumed or trained, with its parents (like make -n).
plan: setup
	$(BIN)/rlhf plan --pipeline $(PIPELINE) $(if $(FORCE),--force) $(if $(RESTART),--restart) $(ROUND_ARGS) $(SET)

registry: setup
	$(BIN)/rlhf registry list

# Stage metrics side by side per pipeline run, e.g. COMPARE_ARGS="--pipeline tiny --last 3 --json".
compare: setup
	$(BIN)/rlhf compare $(COMPARE_ARGS)

# PNG curves of a run's stages (the newest run, or RUN=tag) in runs/<pipeline>/run-<tag>/stages.png.
plot: setup
	$(BIN)/rlhf plot $(if $(RUN),--run $(RUN))

# The default pipeline on every gold task over seeds, one table against the targets (docs/tasks.md), in runs/tasks/.
# TASKS_ARGS="--tasks praise,lists --seeds 1 --variants default" narrows it; key=value overrides go there too.
TASKS_ARGS ?=
tasks: setup
	$(BIN)/rlhf tasks $(TASKS_ARGS)

# Everything: the README's test command, and what .ci/run runs.
test: setup
	$(BIN)/python -m pytest -q

# The development loop: every test that trains no model (maths, config, data, registry, layers), well under a minute.
test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

lint: setup
	$(BIN)/ruff check .

# The chaos test, longer: every stage killed at random moments CHAOS_KILLS times before it may finish.
CHAOS_KILLS ?= 3
chaos: setup
	RLHF_CHAOS_KILLS=$(CHAOS_KILLS) $(BIN)/python -m pytest -q tests/test_chaos.py

clean-runs:
	rm -rf runs

# The GPU check (docs/benchmarks.md): the GPU tests, then pipelines/gpu-bench.yaml's stages, short, at Qwen2.5-0.5B's
# shape, and a summary of tokens/s, MFU and memory per stage and phase (its path is the last line printed).
# DEVICE=cpu: the same end to end at a small shape on the CPU. A GPU box without network needs the wheels that
# `make gpu-wheels` downloads on a machine with it (.gpu-wheels/, carried along). GPU_CHECK_ARGS="--shape qwen2.5-7b".
DEVICE ?= cuda
GPU_CHECK_ARGS ?=
GPU_PYTHON := $(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON))
.PHONY: gpu-check gpu-wheels

gpu-check: $(if $(filter cpu,$(DEVICE)),setup)
	$(if $(filter cpu,$(DEVICE)),$(BIN)/python,$(GPU_PYTHON)) scripts/gpu_check.py --device $(DEVICE) $(GPU_CHECK_ARGS)

gpu-wheels: setup
	$(BIN)/python scripts/gpu_wheels.py
