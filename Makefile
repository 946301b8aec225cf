# loraforge: `make run` runs the demo pipeline with DVC; `make test` runs the test suite.
# Both create .venv and install everything first (torch pinned: CPU wheel here, CUDA build of
# the same version on GPU machines).

VENV        ?= .venv
PYTHON      ?= python3
TORCH_PIN   ?= torch==2.14.1 torchvision==0.29.1
STAMP       := $(VENV)/.installed
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 180

.PHONY: install browser lint docs docs-check run test test-fast sync-dvc sync-docs demo-data bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet $(TORCH_PIN)
	$(VENV)/bin/pip install --quiet -e ".[test]" $(TORCH_PIN)
	touch $(STAMP)

# Headless Chromium for the report tests (Debian packages; needs root). Without it those tests skip.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  { apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null; } || \
	  echo "chromium not installed: the browser tests will be skipped"

run: install
	loraforge sync-dvc --check
	dvc repro
	@echo "LoRA: models/lora.safetensors   report: reports/eval/index.html"

test: install browser lint docs-check
	pytest -q -ra

# ruff: pyflakes + bugbear + line length (config in pyproject.toml), and the house format
lint: install
	ruff check .
	ruff format --check .

# the manual: the params page must match the schemas, and a broken link or a stale page fails the build
docs-check: install
	loraforge sync-docs --check
	NO_MKDOCS_2_WARNING=1 mkdocs build --strict --quiet

docs: install
	NO_MKDOCS_2_WARNING=1 mkdocs serve --dev-addr 127.0.0.1:8000

test-fast: install
	pytest -q -ra -m "not slow"

sync-dvc: install
	loraforge sync-dvc

sync-docs: install
	loraforge sync-docs

demo-data: install
	python scripts/make_demo_data.py

bench: install
	python benchmarks/pipeline_cache.py

clean:
	rm -rf data/ingested data/upscaled data/captions data/latents models reports .loraforge site
