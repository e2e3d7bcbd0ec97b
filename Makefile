# theseus-deploy: `make demo` runs the main job end to end, `make test` runs the tests.
PY ?= .venv/bin/python
VENV ?= .venv
DATA_DIR ?= $(if $(THESEUS_DATA_DIR),$(THESEUS_DATA_DIR),../shared/data/glue)
RUNS ?= runs

.PHONY: install test test-gpu demo results bench-smoke clean

$(VENV)/.installed: setup.py requirements-cpu.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -r requirements-cpu.txt
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest -q tests

test-gpu: install
	$(PY) -m pytest -q -m "gpu or trt" tests

demo: install
	bash scripts/demo.sh

clean:
	rm -rf $(RUNS) .pytest_cache
