# Two entry points for a fresh machine (see README):  `make demo`  and  `make test`.
# Both create .venv, install the pinned dependencies, build the compiled kernels, and are safe to rerun.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMPS := .stamps
CUDA_HOME ?= $(firstword $(wildcard /usr/local/cuda /usr/local/cuda-13.0))
export CUDA_HOME
# Keep the CUDA build small: the architectures we target (Ampere, Hopper; sm_90a is built separately).
export TORCH_CUDA_ARCH_LIST ?= 8.0;9.0
export MAX_JOBS ?= 2

KERNEL_SOURCES := $(wildcard kernels/*.cpp kernels/*.h kernels/cpu/*.cpp kernels/cpu/*.h kernels/cuda/*.cu kernels/cuda/*.cuh kernels/cuda/sm90a/*.cu) setup.py

.PHONY: setup demo test build clean

setup: $(STAMPS)/build

$(STAMPS)/deps: pyproject.toml Makefile
	@mkdir -p $(STAMPS)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "torch==2.14.1" "torchvision==0.29.1" numpy scipy scikit-learn "onnx>=1.15" \
	    "onnxruntime>=1.17" "openvino>=2025.0" timm tqdm pytest pytest-timeout hypothesis ninja "setuptools>=77" wheel
	@touch $@

$(STAMPS)/install: $(STAMPS)/deps pyproject.toml
	QUANTKIT_SKIP_EXT=1 $(PY) -m pip install -q --no-build-isolation --no-deps -e .
	@touch $@

# Incremental (ninja) in-place build of quantkit/_C*.so; reruns only when a kernel source changed.
$(STAMPS)/build: $(STAMPS)/install $(KERNEL_SOURCES)
	$(PY) setup.py -q build_ext --inplace
	@touch $@

build: $(STAMPS)/build

demo: setup
	$(PY) examples/demo.py

test: setup
	$(PY) -m pytest -q tests

clean:
	rm -rf $(STAMPS) build quantkit/*.so *.egg-info
