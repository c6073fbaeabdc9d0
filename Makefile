# Two commands do everything on a fresh machine:
#   make train   set up .venv, prepare a real corpus found on disk, train a tiny LLaMA, sample text
#   make test    install the test extras and run the test suite (what CI runs)
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
# The corpus: this machine's own CPython standard library sources (real text, no downloads).
STDLIB  := $(shell $(PY) -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')
DATA    ?= data/stdlib
CONFIG  ?= launch/configs/tiny-llama.yaml
# the run folder to sample from: the configs' `dir` follows their file name
RUN     ?= runs/$(basename $(notdir $(CONFIG)))
PROMPT  ?= def

.PHONY: setup train test data clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

# torch first, pinned: on a CPU box this takes the CPU wheel, so no CUDA packages are pulled;
# DeepSpeed builds with no compiled ops (its CPU/GPU ops are JIT-built when used).
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	DS_BUILD_OPS=0 $(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	DS_BUILD_OPS=0 $(BIN)/pip install -q -e '.[test]'
	touch $@

setup: $(VENV)/.installed

$(DATA)/meta.json: | $(VENV)/.installed
	$(BIN)/python -m pretrain prepare-data --input '$(STDLIB)/*.py' --tokenizer train --vocab-size 4096 \
	    --seq-len 128 --samples-per-shard 1024 --val-fraction 0.02 --out $(DATA)

data: $(DATA)/meta.json

train: $(DATA)/meta.json
	$(BIN)/python -m pretrain train --config $(CONFIG) data.path=$(DATA)
	$(BIN)/python -m pretrain generate --checkpoint $(RUN) --prompt '$(PROMPT)' --max-new-tokens 80

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest

clean:
	rm -rf runs/tiny-llama $(DATA)
