# lossatlas — the two commands a fresh machine needs:
#   make demo   creates .venv, installs lossatlas (CPU torch first) and runs the demo
#   make test   creates .venv, installs lossatlas with its test extras, runs the linter (make lint) and the test suite
#               (two pytest-xdist workers of one thread each: one per core)
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PIP := $(VENV)/bin/pip
PY := $(VENV)/bin/python
OUT ?= demo_out

.PHONY: demo lint test bench bench-scale experiments clean

$(VENV)/.installed: pyproject.toml setup.py lossatlas/_fastnorms.c
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[dev]"
	# curvlinops, the KFAC tests' reference: --no-deps, since its backpack dependency would pull torchvision
	# and replace the pinned CPU torch (none of the modules it imports needs backpack)
	$(PIP) install -q --no-deps curvlinops-for-pytorch==3.0.1 einconv==0.1.0 einops linear_operator==0.6.1 opt-einsum
	touch $@

# The peers we benchmark against. --no-deps: their optional dependencies (torchvision via
# backpack) would otherwise replace the pinned CPU torch with another build.
$(VENV)/.bench: $(VENV)/.installed
	$(PIP) install -q --no-deps hessian-eigenthings==1.0.0a5 curvlinops-for-pytorch backpack-for-pytorch einconv einops linear_operator opt-einsum
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/lossatlas demo --out $(OUT) --force

# ruff, configured in pyproject.toml: pyflakes, import order, bugbear and Google-style docstrings.
lint: $(VENV)/.installed
	$(VENV)/bin/ruff check lossatlas tests experiments benchmarks

test: lint
	OMP_NUM_THREADS=1 LOSSATLAS_REQUIRE_FASTNORMS=1 $(PY) -m pytest -q -n 2 tests

bench: $(VENV)/.bench
	OMP_NUM_THREADS=2 $(PY) benchmarks/run_all.py

# GPT-2 small (124M) and ResNet-18 (11M) beside PyHessian and curvlinops, then the cost laws; hours on a
# 2-core CPU, run on an otherwise idle machine. SCALE_ARGS=--quick for the minutes-long version.
bench-scale: $(VENV)/.bench
	OMP_NUM_THREADS=2 $(PY) benchmarks/bench_scale.py $(SCALE_ARGS)
	OMP_NUM_THREADS=2 $(PY) benchmarks/bench_costlaws.py $(if $(SCALE_ARGS),--small)

experiments: $(VENV)/.installed
	OMP_NUM_THREADS=2 $(PY) -m pytest -q -m slow tests
	OMP_NUM_THREADS=2 $(PY) experiments/run_all.py

clean:
	rm -rf $(VENV) $(OUT) build *.egg-info
