# GSV3D-PL. `make help` lists the targets.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV        ?= .venv
PY          := $(VENV)/bin/python
PIP         := $(PY) -m pip
# The default pin takes both wheels from this machine's disk; on a cluster override, e.g.
#   make install TORCH_SPEC="torch==2.5.1 torchvision==0.20.1 --index-url https://download.pytorch.org/whl/cu124"
TORCH_SPEC  ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=
# `make test` runs the suite on this many pytest-xdist workers, a file each at a time (0: in one process).
TEST_WORKERS ?= 2
STAMP       := $(VENV)/.installed
RUN_STAMP   := $(VENV)/.installed-run

.PHONY: help install demo demo-seeds distill-study demo-tiny paper-tiny test test-fast lint bench gpu-check clean

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  make %-10s %s\n", $$1, $$2}'

$(VENV)/bin/python:
	python3 -m venv $(VENV)

# Re-run pip only when the package metadata changed: `make install` is quick once done. Two levels: what the
# training and predict commands need (the demo installs only that), then the app (gradio) and test extras.
$(RUN_STAMP): setup.cfg pyproject.toml | $(VENV)/bin/python
	$(PIP) install -q --upgrade pip
	$(PIP) install $(TORCH_SPEC)
	$(PIP) install -e .
	touch $(RUN_STAMP)

$(STAMP): $(RUN_STAMP)
	$(PIP) install -e '.[dev]'
	touch $(STAMP)

install: $(STAMP) ## create .venv, install torch (TORCH_SPEC, default torch==2.14.1 torchvision==0.29.1) then the package with its app + dev extras (idempotent)

demo: $(RUN_STAMP) ## the CPU miniature end to end: VAE -> SV3D fine-tune -> decoder (stage 1) -> LoRA distill (stage 2) -> one held-out table
	$(VENV)/bin/gsv3d fit --config configs/vae/mini.yaml
	@# SV3D's fine-tune and the decoder read only the VAE's output: side by side, one core each (docs/miniature.md)
	$(PY) -m gsv3d_pl.tools.run_parallel --threads 1 configs/sv3d/mini.yaml configs/decoder/mini.yaml
	$(VENV)/bin/gsv3d fit --config configs/distill/mini.yaml
	$(PY) -m gsv3d_pl.tools.demo_table
	@echo "Outputs: runs/{vae,sv3d,decoder,distill}_mini (checkpoints, csv/, images/, heldout_eval.json, heldout_e2e.json)"

demo-seeds: $(RUN_STAMP) ## after `make demo`: stage 2 again at seeds 1 and 2 side by side (same SV3D and decoder), then the table with distilled vs undistilled as mean ± std over 3 seeds
	$(PY) -m gsv3d_pl.tools.run_parallel --threads 1 --seeds 1 2 --seed-key model.init_args.e2e_seed configs/distill/mini.yaml
	$(PY) -m gsv3d_pl.tools.demo_table --e2e runs/distill_mini/heldout_e2e.json runs/distill_mini_seed1/heldout_e2e.json runs/distill_mini_seed2/heldout_e2e.json

distill-study: $(RUN_STAMP) ## after `make demo`: stage 2's named recipes (configs/distill/recipes/) at seeds 0 1 2 on the demo's SV3D and decoder, two at a time -> runs/distill_study/study.md (docs/distillation.md)
	$(PY) -m gsv3d_pl.tools.distill_study --out runs/distill_study $(sort $(wildcard configs/distill/recipes/*.yaml))

demo-tiny: $(RUN_STAMP) ## the random-encoder smoke pipeline the tests use: decoder (stage 1) -> LoRA distill (stage 2), ~6 min
	$(VENV)/bin/gsv3d fit --config configs/decoder/tiny.yaml
	$(VENV)/bin/gsv3d fit --config configs/distill/tiny.yaml

paper-tiny: $(RUN_STAMP) ## the paper's protocol at toy scale through the local runner: Table 2 (six chained rows: decoder -> distill -> end-to-end test), then Table 1 (the Full row's test: SV3D with the LoRA off vs GSV3D)
	@# The tables are printed even when a row failed (the report names the failure); the target still fails then.
	$(VENV)/bin/gsv3d sweep configs/sweeps/ablations_tiny.yaml --local --out runs/ablations_tiny; rc=$$?; \
	$(VENV)/bin/gsv3d report runs/ablations_tiny --output runs/ablations_tiny/table2.md || rc=1; \
	echo "== Table 1 (runs/ablations_tiny/full/seed0/distill/results.md)"; \
	cat runs/ablations_tiny/full/seed0/distill/results.md || rc=1; exit $$rc

test: $(STAMP) ## run the whole test suite (slow and slurm tests included; gpu tests skip without CUDA)
	$(VENV)/bin/pytest -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

test-fast: $(STAMP) ## the fast tests only (not slow, not slurm)
	$(VENV)/bin/pytest -n $(TEST_WORKERS) --dist loadfile -m "not slow and not slurm" $(PYTEST_ARGS)

lint: $(STAMP) ## ruff check
	$(VENV)/bin/ruff check .

bench: $(STAMP) ## run every benchmark in benchmarks/ and print their tables
	@for b in benchmarks/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

gpu-check: $(STAMP) ## what a CUDA machine does: backend parity, bf16 decoder step, SV3D memory (docs/gpu.md; CPU parts only without CUDA)
	$(PY) benchmarks/gpu_check.py --json gpu_check.json

clean: ## remove caches and run outputs (keeps .venv)
	rm -rf runs lightning_logs .pytest_cache .ruff_cache build dist *.egg-info
	find . -name __pycache__ -type d -prune -not -path './$(VENV)/*' -exec rm -rf {} +
