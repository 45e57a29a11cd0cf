# The two Quickstart commands: `make demo` and `make test`. Each creates .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test bench clean lint docs dist fuzz

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# The CPU build of torch (for the interop tests and benchmarks); a plain `torch` would pull a multi-GB CUDA build.
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[test,dev]"
	$(PY) -c "import jax, flax, optax, chex, torch; print('jax', jax.__version__, 'flax', flax.__version__, 'torch', torch.__version__)"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m experiments run configs/ioffe_fig1.yaml

test: $(STAMP)
	$(PY) -m pytest -q

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
# Each of its tests runs for longer than the suite's per-test timeout (pyproject.toml), so that is lifted here.
fuzz: $(STAMP)
	JBN_FUZZ_PROFILE=long $(PY) -m pytest -q --timeout=0 --hypothesis-show-statistics tests/test_differential_fuzz.py

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
	rm -rf $(VENV) runs .pytest_cache site dist
