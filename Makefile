# Two commands: `make run` sets up and runs the bot, `make test` sets up and runs the tests.
VENV ?= .venv
PY := $(VENV)/bin/python
# A machine with an NVIDIA driver gets the normal (CUDA) torch; others the CPU build 2.13.0.
TORCH_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo 'torch>=2.4,<3' || echo 'torch==2.13.0')

.PHONY: setup run test lint
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev,ray]"
	touch $@

# With no GPU and no MODEL configured, run the tiny demo model (it draws noise) instead of
# trying to fetch 20 GB of Z-Image-Turbo weights onto a CPU.
run: setup
	@if [ -z "$$MODEL" ] && ! grep -qs '^MODEL=' .env && ! command -v nvidia-smi >/dev/null 2>&1; then \
		echo "no GPU found and MODEL not set: using MODEL=tiny (a random demo model that draws noise)"; \
		MODEL=tiny $(PY) -m bot $(ARGS); \
	else $(PY) -m bot $(ARGS); fi

test: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

lint: setup
	$(PY) -m ruff check . && $(PY) -m ruff format --check . && $(PY) -m mypy
