# qshard: `make demo` sets up and runs the demo; `make test` sets up and runs the test suite.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed

QVENV  ?= .venv-quant
QSTAMP  = $(QVENV)/.installed

.PHONY: setup quantizers demo test clean

setup: $(STAMP)

# `qshard quantize` runs llm-compressor from its own virtualenv (its pins are not qshard's).
quantizers: $(QSTAMP)

$(QSTAMP): requirements-quant.txt
	$(PYTHON) -m venv $(QVENV)
	$(QVENV)/bin/pip install -q -r requirements-quant.txt
	touch $(QSTAMP)

# torch==2.13.0 (pinned in requirements.txt) is the CPU wheel on this machine's disk; any other
# version pulls several GB of CUDA packages.
$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $(STAMP)

demo: setup
	rm -rf build/demo-model
	$(BIN)/qshard init-tiny build/demo-model --arch llama --size small \
		--data examples/data/demo_alpaca.jsonl --data examples/data/demo_chat.jsonl
	$(BIN)/qshard train examples/demo.yaml --overwrite

# pytest exits 5 when it collected no tests; make treats any non-zero exit as failure.
test: setup quantizers
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf build runs $(VENV) $(QVENV)
