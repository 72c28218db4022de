# Two commands set everything up on a fresh machine:
#   make demo   create .venv, install, run the main job
#   make test   create .venv, install, run the whole suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test gpu-test bench train-demo docs venv clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# the CPU build of torch (a pinned version keeps pip off the multi-GB CUDA build);
	# pyproject.toml keeps a range for users
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q triton==3.6.0 "numpy<2.3" -e ".[test,plot]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) -m sparsedsl.demo

# Train a tiny language model on associative recall with dense causal, MoBA and NSA
# attention (examples/train_tiny.py): the same steps for each, curves and summaries under
# out/train/. Sized for the machine: the GPU size on a CUDA device, a tiny one in Triton's
# interpreter otherwise. More flags: make train-demo TRAIN_ARGS="--steps 100"
TRAIN_OUT ?= out/train
TRAIN_ARGS ?=
train-demo: $(STAMP)
	$(PY) examples/train_tiny.py examples/dense_causal.attn --out $(TRAIN_OUT) --json $(TRAIN_OUT)/dense_causal.json $(TRAIN_ARGS)
	$(PY) examples/train_tiny.py moba --out $(TRAIN_OUT) --json $(TRAIN_OUT)/moba.json $(TRAIN_ARGS)
	$(PY) examples/train_tiny.py nsa --out $(TRAIN_OUT) --json $(TRAIN_OUT)/nsa.json $(TRAIN_ARGS)
	$(PY) examples/train_tiny.py --compare $(TRAIN_OUT)/dense_causal.json $(TRAIN_OUT)/moba.json $(TRAIN_OUT)/nsa.json --out $(TRAIN_OUT)

# the suite runs on every core (pytest-xdist): the Triton interpreter is CPU-bound
test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider -n auto --durations=10

# docs/gallery.md and docs/img/*.png from examples/*.attn (sparsedsl show, sparsedsl cost):
# rerun after changing an example or the compiler; the output is deterministic
docs: $(STAMP)
	$(PY) scripts/make_docs.py

# On a CUDA machine: the kernel tests in bfloat16 on the GPU (uses the python3 there)
# (each generated spec compiles its own kernels: SPARSEDSL_KERNEL_EXAMPLES sets how many)
gpu-test:
	SPARSEDSL_TEST_DEVICE=cuda SPARSEDSL_TEST_DTYPE=bfloat16 $(GPU_PY) -m pytest -q tests/test_kernels.py
	SPARSEDSL_TEST_DEVICE=cuda SPARSEDSL_TEST_DTYPE=float32 $(GPU_PY) -m pytest -q tests/test_kernels.py
	SPARSEDSL_TEST_DEVICE=cuda SPARSEDSL_TEST_DTYPE=bfloat16 SPARSEDSL_KERNEL_EXAMPLES=$${SPARSEDSL_KERNEL_EXAMPLES:-10} \
		$(GPU_PY) -m pytest -q tests/test_kernel_properties.py
	SPARSEDSL_TEST_DEVICE=cuda $(GPU_PY) -m pytest -q tests/test_decode.py -k builtins

GPU_PY ?= python3

# On a CUDA machine (sparsedsl installed in GPU_PY's environment): sparsedsl's kernels against
# SDPA (cuDNN, flash), FlexAttention and fla's parallel_nsa (when fla-core is installed) at
# 8k-64k tokens; table, JSON and plot under out/bench/. Shorter: make bench BENCH_ARGS=--quick;
# one case: BENCH_ARGS="--case moba --seq 8k,16k" (sparsedsl bench --help lists the options)
BENCH_OUT ?= out/bench
BENCH_ARGS ?=
bench:
	$(GPU_PY) -m sparsedsl.bench --json $(BENCH_OUT)/bench.json --png $(BENCH_OUT)/bench.png $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
