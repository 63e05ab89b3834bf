# Two entry points (see README): `make run` and `make test`. Both build the environment first if needed.
SHELL := /bin/bash
LOCK_HASH := $(shell cat envs/requirements.lock envs/bootstrap.sh | sha256sum | cut -c1-16)
DMD2_CACHE ?= $(HOME)/.cache/dmd2
VENV := $(DMD2_CACHE)/venv-$(LOCK_HASH)
export PATH := $(VENV)/bin:$(PATH)
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export DVC_NO_ANALYTICS := 1
export WANDB_SILENT := true

.PHONY: env run test lint clean
env:
	@envs/bootstrap.sh $(VENV)
	@# point the (shared) venv's editable install at this checkout; quick, and right for every clone
	@$(VENV)/bin/pip install --quiet --no-deps --no-build-isolation -e . 2>&1 | grep -v "^$$" || true

run: env
	snakemake --cores all --workflow-profile workflow/profiles/default

test: env
	@envs/system-packages.sh
	WANDB_MODE=offline pytest

lint: env
	ruff check src tests benchmarks tools

clean:
	rm -rf data models results work logs .snakemake
