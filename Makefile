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

.PHONY: env run test system-deps lint clean
env:
	@envs/bootstrap.sh $(VENV)
	@# point the (shared) venv's editable install at this checkout; quick, and right for every clone
	@$(VENV)/bin/pip install --quiet --no-deps --no-build-isolation -e .

run: env
	snakemake --cores all --workflow-profile workflow/profiles/default

# `make test` changes nothing outside the checkout and the cache; the tests that need system packages skip and say
# which. `make system-deps` (root + apt-get, asked for explicitly; CI runs it) installs them: chromium, Slurm, munge.
# one pytest-xdist worker per core (at most 4: each holds its own tiny projects); tests that share a module's
# fixtures or one local Slurm cluster carry an xdist_group mark and run on one worker
test: env
	WANDB_MODE=offline pytest -n auto --maxprocesses 4 --dist loadgroup

system-deps:
	envs/system-packages.sh

lint: env
	ruff check src tests benchmarks tools

clean:
	rm -rf data models results work logs .snakemake
