# theseus-deploy: `make demo` runs the main job end to end, `make test` runs the tests.
PY ?= .venv/bin/python
VENV ?= .venv
DATA_DIR ?= $(if $(THESEUS_DATA_DIR),$(THESEUS_DATA_DIR),../shared/data/glue)
RUNS ?= runs
PYTRITON ?= 0.7.0

.PHONY: install test test-gpu gpu-check demo results bench-smoke bench-baseline clean

# constraints.txt: the exact tested versions of torch, transformers, onnxruntime, onnx, onnxscript, accelerate
$(VENV)/.installed: setup.py requirements-cpu.txt constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt -r requirements-cpu.txt
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	# serve: PyTriton without its numpy<2 pin; its Triton Python-backend stub gets its own environment
	$(PY) -m pip install -q --no-deps "nvidia-pytriton==$(PYTRITON)"
	test -x $(VENV)/triton-stub-env/bin/python || $(PY) -m venv $(VENV)/triton-stub-env
	$(VENV)/triton-stub-env/bin/python -m pip install -q "nvidia-pytriton==$(PYTRITON)"
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m ruff check .
	$(PY) -m pytest -q tests

test-gpu: install
	$(PY) -m pytest -q -m "gpu or trt" tests

# On a CUDA machine (no `make install`: keep its CUDA torch): GPU tests + GPU bench into one folder,
# under 8 minutes. make gpu-check PY=python3 GPU_OUT=gpu-out BERT_CONFIG=<bert-base folder> DATA_DIR=<glue_data>
GPU_OUT ?= runs/gpu-check
BERT_CONFIG ?= $(if $(THESEUS_BERT_CONFIG),$(THESEUS_BERT_CONFIG),../shared/models/bert-base-uncased)
gpu-check:
	PY=$(PY) bash scripts/gpu_check.sh $(GPU_OUT) $(BERT_CONFIG) $(DATA_DIR)

demo: install
	bash scripts/demo.sh

# CI's latency regression gate on tiny models (ratios vs theseus_deploy/bench/baselines/ci-smoke.json)
bench-smoke: install
	PY=$(PY) bash scripts/bench_smoke.sh

# Refresh the committed baseline (on a quiet machine of CI's kind; see docs/bench.md)
bench-baseline: install
	PY=$(PY) bash scripts/bench_smoke.sh --update

# docs/results.md: every number of the MiniLM GLUE results (hours on 2 CPU cores)
TASKS ?= mrpc,rte,stsb,cola,sst2
SEEDS ?= 42
# every seed compresses the predecessor fine-tuned with seed PRED_SEED
PRED_SEED ?= 42
results: install
	$(PY) scripts/results.py run --tasks $(TASKS) --seeds $(SEEDS) --predecessor-seed $(PRED_SEED)
	$(PY) scripts/results.py bench --tasks $(TASKS)

clean:
	rm -rf $(RUNS) .pytest_cache
