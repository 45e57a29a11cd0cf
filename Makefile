# The two Quickstart commands: `make demo` and `make test`. Each creates .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# The CPU build of torch (for the interop tests and benchmarks); a plain `torch` would pull a multi-GB CUDA build.
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[test,experiments,bench,interop]"
	$(PY) -c "import jax, flax, optax, chex, torch; print('jax', jax.__version__, 'flax', flax.__version__, 'torch', torch.__version__)"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m experiments run configs/ioffe_fig1.yaml

test: $(STAMP)
	$(PY) -m pytest -q

# The benchmark suite: writes benchmarks/RESULTS.md and benchmarks/results.png (see benchmarks/run.py for options).
bench: $(STAMP)
	$(PY) -m benchmarks.run

clean:
	rm -rf $(VENV) runs .pytest_cache
