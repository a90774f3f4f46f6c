# One command each: `make repro` sets up and runs the pipeline, `make test` sets up and runs the tests.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup repro experiments deps test test-fast bench bench-lora bench-compose bench-cuda clean

setup: $(STAMP)

# Re-installs when pyproject.toml changes.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

repro: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" DVC_NO_ANALYTICS=1 dvc repro

# The experiments of experiments/dvc.yaml (rank sweep, seeds, backends, replay, full fine-tuning, learning rates, an adapter per digit, composition) and their report.
experiments: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" dvc repro experiments/dvc.yaml

# Each stage's code deps in dvc.yaml and experiments/dvc.yaml, from the imports of its module (tools/code_deps.py).
deps: $(STAMP)
	$(BIN)/python -m tools.code_deps

# Tests: the whole suite (what CI runs), or the fast tier: library, params, data reader and stage units (no DVC,
# no Prefect server, no real MNIST, no test of several seconds).
# Two pytest workers: the slow tests spend much of their time waiting on servers, git and DVC, not computing.
test: $(STAMP) /usr/sbin/sshd
	PATH="$(CURDIR)/$(BIN):$$PATH" DVC_NO_ANALYTICS=1 python -m pytest -n 2 --dist worksteal --durations=15

# The SSH-remote test starts Debian's sshd on 127.0.0.1 itself; installing the package must not start the service
# (policy-rc.d 101 tells the package scripts not to).
/usr/sbin/sshd:
	$(if $(filter 0,$(shell id -u)),,sudo) sh -ec 'guard=; [ -e /usr/sbin/policy-rc.d ] || { guard=/usr/sbin/policy-rc.d; \
	  printf "#!/bin/sh\nexit 101\n" > $$guard; chmod +x $$guard; }; trap "rm -f $$guard" EXIT; \
	  apt-get update -qq; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssh-server >/dev/null'

test-fast: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" DVC_NO_ANALYTICS=1 python -m pytest -n 2 -m "not slow"

# Benchmarks are run on demand, never as tests: stage times against the seed notebook, then LoRA layers; each writes
# its tables into its docs page.
bench: $(STAMP) bench-lora bench-compose
	PATH="$(CURDIR)/$(BIN):$$PATH" DVC_NO_ANALYTICS=1 python -m bench.pipeline --write docs/performance.md

bench-lora: $(STAMP)
	$(BIN)/python -m bench.lora_layers --write docs/library.md

bench-compose: $(STAMP)
	$(BIN)/python -m bench.compose --write docs/experiments.md

# On a GPU machine whose python3 already has torch (DVC not needed): the CUDA tests, then the CUDA benchmark.
bench-cuda:
	$(PYTHON) -m pytest -q -rA -p no:cacheprovider tests/test_cuda.py
	$(PYTHON) -m bench.pipeline --device cuda --kernels-only

clean:
	rm -rf $(VENV) .pytest_cache
