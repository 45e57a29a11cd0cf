# The two Quickstart commands: `make demo` and `make test`. Each creates .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test bench bench-accelerators accel-env test-accelerators clean lint docs dist fuzz

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# The CPU build of torch (for the interop tests and benchmarks); a plain `torch` would pull a multi-GB CUDA build.
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[test,dev]"
	$(PY) -c "import jax, flax, optax, chex, torch; print('jax', jax.__version__, 'flax', flax.__version__, 'torch', torch.__version__)"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m experiments run configs/ioffe_fig1.yaml

# The whole suite under JAX's strict settings (tests/conftest.py: rank promotion raises, dtype promotion strict), so
# that no implicit broadcast or promotion comes back into jbn; tests whose peer library (or a program outside the
# library: benchmarks, the docs' examples) fails under them are marked peer_not_strict / script_not_strict and run
# under JAX's default rules. Then the files that exercise dtype rules again with x64 on (JBN_STRICT=x64).
X64_TESTS := tests/test_functional.py tests/test_running_average.py

# Each invocation spreads its tests over TEST_WORKERS processes (pytest-xdist; the tests that share a downloaded
# source distribution are one xdist_group, kept on one process). Two: the suite's budget is 20 minutes on 2 cores.
# tests/run_suite.py runs an invocation once more, whole, if a test process crashed (a signal inside XLA, not a
# failing test); xdist restarts no crashed worker, since with --dist loadgroup it hangs after one.
TEST_WORKERS ?= 2
PYTEST := $(PY) tests/run_suite.py -q -n $(TEST_WORKERS) --dist loadgroup --max-worker-restart=0
test: $(STAMP)
	$(PYTEST)
	JBN_STRICT=x64 $(PYTEST) $(X64_TESTS)

# The benchmark suite: the op-level suite (benchmarks/run.py), the ResNet-18 training step
# (benchmarks/model.py), the statistics strategies (benchmarks/statistics_strategies.py) and
# the float32 forward's floor (benchmarks/floor.py);
# each rewrites benchmarks/RESULTS.md with every section whose JSON is there. On a GPU: bash benchmarks/device.sh.
bench: $(STAMP)
	$(PY) -m benchmarks.run
	$(PY) -m benchmarks.model
	$(PY) -m benchmarks.statistics_strategies
	$(PY) -m benchmarks.floor

# The differential fuzz's long profile (tests/test_differential_fuzz.py): 20 times the CI run's examples (23,000),
# each path of jbn against the float64 reference; `make test` runs the CI profile (1,150 examples, fixed seed).
# Each of its tests runs for longer than the suite's per-test timeout (pyproject.toml), so that is lifted here;
# each runs in a process of its own (one process through all of them once died; its compiled programs near the
# kernel's limit on memory mappings are the likely cause, which tests/compiled_programs.py now keeps it from).
FUZZ_TESTS = moments batch_norm_training evaluation batch_renorm_training ghost_batches synchronized_statistics \
	gradients bad_arguments
fuzz: $(STAMP)
	for t in $(FUZZ_TESTS); do \
	  JBN_FUZZ_PROFILE=long $(PY) -m pytest -q --timeout=0 --hypothesis-show-statistics \
	    tests/test_differential_fuzz.py -k "test_$$t" || exit 1; \
	done

# The accelerator plans (benchmarks/accelerators.py): jbn and its peers compiled deviceless for TPU v5e
# (libtpu, jax's tpu extra) and for NVIDIA H100 and H200 (the CUDA 12 plugin, no CUDA runtime needed), in an
# environment of their own so the test environment keeps plain jaxlib. Rewrites benchmarks/RESULTS-accelerators.md,
# then benchmarks/RESULTS-tpu-conv-fusion.md (benchmarks/tpu_conv_fusion.py: statistics beside a convolution on TPU).
ACCEL_VENV  ?= .venv-accel
ACCEL_PY    := $(ACCEL_VENV)/bin/python
ACCEL_STAMP := $(ACCEL_VENV)/.installed
# The same versions as the test environment (nothing pinned by hand): jax's tpu extra and the CUDA plugin at its jax
# version, every other package constrained to what .venv resolved.
ACCEL_CONSTRAINTS := $(ACCEL_VENV)/constraints.txt

$(ACCEL_STAMP): $(STAMP)
	$(PYTHON) -m venv $(ACCEL_VENV)
	$(PY) -m pip freeze --exclude-editable | grep -v '^torch' > $(ACCEL_CONSTRAINTS)
	jax_version=$$($(PY) -c "import jax; print(jax.__version__)") && \
	$(ACCEL_PY) -m pip install -q -c $(ACCEL_CONSTRAINTS) "jax[tpu]==$$jax_version" \
		"jax-cuda12-plugin==$$jax_version" "jax-cuda12-pjrt==$$jax_version" \
		flax equinox dm-haiku optax matplotlib tqdm pytest pytest-timeout
	$(ACCEL_PY) -m pip install -q --no-deps -e .
	$(ACCEL_PY) -c "import jax, libtpu, flax; print('jax', jax.__version__, 'libtpu', libtpu.__version__, 'flax', flax.__version__)"
	touch $(ACCEL_STAMP)

accel-env: $(ACCEL_STAMP)

bench-accelerators: $(ACCEL_STAMP)
	$(ACCEL_PY) -m benchmarks.accelerators
	$(ACCEL_PY) -m benchmarks.tpu_conv_fusion

# jbn's accelerator plans against flax's (tests/test_accelerator_plans.py; compile properties, not timings).
test-accelerators: $(ACCEL_STAMP)
	JAX_PLATFORMS=cpu $(ACCEL_PY) -m pytest -q tests/test_accelerator_plans.py

# The lint and type gate (.ci/run): ruff's rules and formatting over the repository, mypy over jbn/ (pyproject.toml).
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# The documentation site (mkdocs.yml) in site/; --strict turns every warning (a broken link, a page left out of
# the nav, a docstring that does not resolve) into an error.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet  # (that variable: no MkDocs 2.0 banner)

# The wheel and sdist in dist/, checked as PyPI would (twine) and for their contents (py.typed, LICENSE, version);
# then the wheel alone in a fresh environment: the pure layer must work with the runtime dependencies only.
dist: $(STAMP)
	rm -rf dist build/wheel-venv
	$(PY) -m build --no-isolation --outdir dist .
	$(VENV)/bin/twine check --strict dist/*
	$(PY) .ci/check_dist.py dist
	$(PYTHON) -m venv build/wheel-venv
	build/wheel-venv/bin/python -m pip install -q dist/*.whl
	cd build && wheel-venv/bin/python ../.ci/check_dist.py --installed

clean:
	rm -rf $(VENV) $(ACCEL_VENV) runs .pytest_cache site dist
