# AlexNet on ImageNet: shards -> DALI pipelines -> PyTorch. Every target installs what it needs first.
# Variables: RAW (raw ImageNet), DATA (shard dir), RUN (run dir), CKPT (checkpoint), ARGS (--key=value ...).
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON     ?= python3
VENV       ?= .venv
DALI_CUDA  ?= 130# 120 for clusters whose driver only supports CUDA 12
WHEELHOUSE ?=# a folder from `make wheelhouse`: install from it with no index access
PEERS      ?=# 1: also install the peers `make bench` compares with (FFCV; needs libturbojpeg0-dev libopencv-dev)
TB         ?=# 1: also install TensorBoard (train.py --tensorboard)

SAMPLE_RAW  := data/sample-raw
SAMPLE_DATA := data/sample
RAW        ?= $(SAMPLE_RAW)
DATA       ?= $(SAMPLE_DATA)
DEMO_RUN   := runs/demo
RUN        ?= $(if $(ON_SAMPLE),$(DEMO_RUN),runs/alexnet)
CKPT       ?= $(RUN)/checkpoint.pt
ARGS       ?=
BENCH_DATA ?= data/bench
REAL_IMAGES ?= ../shared/data/imagenet-sample

PY      := $(VENV)/bin/python
# With DATA left at the built-in sample, targets build it first and training uses the demo preset (the paper's
# lr is tuned for 1000 classes, not 10), so that every target works with no arguments.
ON_SAMPLE := $(filter $(SAMPLE_DATA),$(DATA))
SAMPLE_IF_DEFAULT := $(if $(ON_SAMPLE),$(SAMPLE_DATA)/manifest.json)
DEMO_IF_DEFAULT   := $(if $(ON_SAMPLE),--preset=demo)
CKPT_IF_DEFAULT   := $(if $(filter $(DEMO_RUN)/checkpoint.pt,$(CKPT)),$(DEMO_RUN)/checkpoint.pt)
STAMP   := $(VENV)/.installed-cuda$(DALI_CUDA)$(if $(PEERS),-peers)$(if $(TB),-tb)
COMMA   := ,
EXTRAS  := .[cuda$(DALI_CUDA),dev$(if $(PEERS),$(COMMA)peers)$(if $(TB),$(COMMA)tb)]
PIP_SRC := $(if $(WHEELHOUSE),--no-index --find-links $(WHEELHOUSE),)

.PHONY: help setup demo test lint sample shards verify train eval export bench bench-data wheelhouse gpu-payload gpu-rehearse clean

help:
	@echo "make demo                                   # fresh machine: sample data, shards, CPU training, 10-crop eval"
	@echo "make test                                   # ruff, then the test suite (GPU tests skip without a GPU)"
	@echo "make lint                                   # ruff check (pinned in the dev extra)"
	@echo "make shards RAW=<imagenet dir> DATA=<shard dir> [ARGS=...]"
	@echo "make train  DATA=<shard dir> RUN=<run dir> [ARGS='--key=value ...']"
	@echo "make eval   DATA=<shard dir> CKPT=<run dir>/checkpoint.pt"
	@echo "make export CKPT=<run dir>/best.pt          # <run dir>/best.safetensors: weights, classes, mean image"
	@echo "make bench  DATA=<shard dir>"
	@echo "make bench-data; make bench DATA=data/bench   # realistic: 1000 real images x20"
	@echo "make setup PEERS=1                           # also FFCV, for make bench's peer rows"
	@echo "make setup TB=1                              # also TensorBoard, for train.py --tensorboard"
	@echo "make verify DATA=<shard dir>                # re-read every shard against the manifest"
	@echo "make setup [DALI_CUDA=120] [WHEELHOUSE=<dir>] # project-local .venv"
	@echo "make wheelhouse [WHEELHOUSE=<dir>]           # on a login node: every wheel, for offline compute nodes"
	@echo "make gpu-payload                             # .dev/gpu/p1..p3 for a GPU machine without internet (docs/GPU.md)"
	@echo "make gpu-rehearse                            # the GPU kit's three stages here, without a GPU, ending with its table"

setup: $(STAMP)

# On a login node with internet: every wheel that `make setup` installs (for this PYTHON and DALI_CUDA, plus the
# build backend the editable install needs) into WHEELHOUSE (default wheelhouse/). On a compute node without
# internet, `make setup WHEELHOUSE=<that dir>` then installs from it alone.
wheelhouse:
	$(PYTHON) -m pip download --disable-pip-version-check --dest $(or $(WHEELHOUSE),wheelhouse) "$(EXTRAS)" "setuptools>=68" wheel

# Reinstalls only when pyproject.toml changes: a second `make setup` is instant.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check $(PIP_SRC) -e "$(EXTRAS)"
	touch $@

test: lint
	$(PY) -m pytest -q

lint: setup
	$(PY) -m ruff check .

sample: setup
	$(PY) -m shards sample --out=$(SAMPLE_RAW)

shards: setup $(if $(filter $(SAMPLE_RAW),$(RAW)),$(SAMPLE_RAW)/ILSVRC2012_img_train.tar)
	$(PY) -m shards build --raw=$(RAW) --out=$(DATA) $(ARGS)

# The built-in sample as files, so that train/eval/bench with no arguments build it once, not every time.
$(SAMPLE_RAW)/ILSVRC2012_img_train.tar: | setup
	$(PY) -m shards sample --out=$(SAMPLE_RAW)

$(SAMPLE_DATA)/manifest.json: $(SAMPLE_RAW)/ILSVRC2012_img_train.tar
	$(PY) -m shards build --raw=$(SAMPLE_RAW) --out=$(SAMPLE_DATA)

verify: setup
	$(PY) -m shards verify --data=$(DATA)

train: setup $(SAMPLE_IF_DEFAULT)
	$(PY) train.py --data=$(DATA) --run=$(RUN) $(DEMO_IF_DEFAULT) $(ARGS)

eval: setup $(SAMPLE_IF_DEFAULT) $(CKPT_IF_DEFAULT)
	$(PY) eval.py --data=$(DATA) --checkpoint=$(CKPT) $(ARGS)

# The inference file beside the checkpoint (CKPT with .safetensors): no DATA needed, the checkpoint carries it all.
export: setup $(CKPT_IF_DEFAULT)
	$(PY) -m model.export --checkpoint=$(CKPT) $(ARGS)

# The demo's checkpoint, for `make eval` or `make export` with no arguments on a machine that has not trained yet.
$(DEMO_RUN)/checkpoint.pt: | $(SAMPLE_DATA)/manifest.json
	$(PY) train.py --data=$(SAMPLE_DATA) --run=$(DEMO_RUN) --preset=demo

bench: setup $(SAMPLE_IF_DEFAULT)
	$(PY) -m bench --data=$(DATA) $(ARGS)

# Realistic benchmark shards: the 1000 real ILSVRC2012 images (REAL_IMAGES) as class folders of links, built by
# `make shards`' own command, then copied 20 times.
bench-data: setup
	rm -rf $(BENCH_DATA) $(BENCH_DATA)-raw $(BENCH_DATA)-1x
	$(PY) -m bench.folders --images=$(REAL_IMAGES) --out=$(BENCH_DATA)-raw
	$(PY) -m shards build --raw=$(BENCH_DATA)-raw --out=$(BENCH_DATA)-1x
	$(PY) -m shards replicate --data=$(BENCH_DATA)-1x --out=$(BENCH_DATA) --copies=20

# The GPU first-run kit (docs/GPU.md): the payload's parts, and a rehearsal of the three stages without a GPU.
gpu-payload: setup
	scripts/make_gpu_payload.sh

gpu-rehearse: setup
	scripts/gpu_rehearse.sh

demo: setup $(SAMPLE_DATA)/manifest.json
	$(PY) train.py --data=$(SAMPLE_DATA) --run=$(DEMO_RUN) --preset=demo $(ARGS)
	$(PY) eval.py --data=$(SAMPLE_DATA) --checkpoint=$(DEMO_RUN)/checkpoint.pt

clean:
	rm -rf $(VENV) $(SAMPLE_DATA) $(SAMPLE_RAW) $(DEMO_RUN)
