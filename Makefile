# xares-eval — one entry point for setup, tests, the offline demo and the base image.
#   make demo    set everything up, then run the whole evaluation on the embedded demo (offline, CPU)
#   make test    set everything up, then run the full test suite (docker tests included)

PYTHON   ?= python3
VENV     ?= .venv
BIN      := $(VENV)/bin
PIP      := $(BIN)/pip install -q -c constraints.txt
DEMO_OUT ?= demo_out
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1

.PHONY: setup system-deps docker-ready base-image template-onnx test test-fast demo lint clean

setup: system-deps $(VENV)/.installed

# Debian tools the demo and tests use: espeak-ng + sox make the demo audio, docker + debootstrap the
# offline base image, bubblewrap isolates the ONNX worker, chromium loads the results site in the tests.
system-deps:
	@missing=""; \
	for c in espeak-ng:espeak-ng sox:sox dockerd:docker.io debootstrap:debootstrap bwrap:bubblewrap chromium:chromium; do \
	  command -v $${c%%:*} >/dev/null 2>&1 || missing="$$missing $${c#*:}"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing libsox-fmt-all >/dev/null; \
	fi

$(VENV)/.installed: pyproject.toml constraints.txt
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) torch==2.13.0
	$(PIP) -e ".[dev,captions,cluster]"
	touch $@

docker-ready: setup
	bash docker/ci-docker.sh

base-image: docker-ready

test: setup docker-ready
	$(BIN)/pytest -q

test-fast: setup
	$(BIN)/pytest -q -m "not docker and not slow"

demo: setup
	$(BIN)/xares-eval demo --out $(DEMO_OUT)

# The committed ONNX baseline (submission_template/onnx_model) is the export of submission_template/onnx;
# tests/test_template.py fails when they drift apart.
template-onnx: setup
	$(BIN)/python -c "from pathlib import Path; from evaluator.submission.export import export_encoder; \
	export_encoder(Path('submission_template/onnx/encoder.py'), Path('submission_template/onnx_model/model.onnx'))"

lint: setup
	$(BIN)/ruff check evaluator tests benchmarks

clean:
	rm -rf $(DEMO_OUT) .pytest_cache
