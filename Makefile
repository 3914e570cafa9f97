# Two entry points: `make demo` (set up, then train the embedded MoM demo on MQAR) and `make test` (set up, then
# run the test suite). Both create .venv on first use; later runs reuse it.
PYTHON ?= python3
VENV ?= .venv
# A CPU build of torch by default; on a GPU machine set TORCH_SPEC to the CUDA build you use (or an installed one).
TORCH_SPEC ?= torch==2.13.0
MEGATRON_SPEC ?= megatron-core==0.19.2
BIN := $(VENV)/bin

.PHONY: setup demo test gpu-check clean

$(BIN)/.ready: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	# megatron-core >= 0.17 declares Python >= 3.12 but runs on 3.11; its runtime needs are our own dependencies.
	$(BIN)/pip install -q --no-deps --ignore-requires-python "$(MEGATRON_SPEC)"
	$(BIN)/pip install -q -e ".[test]"
	touch $@

setup: $(BIN)/.ready

demo: setup
	$(BIN)/linear-moe-pretrain $(ARGS)

test: setup
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
