# One command per check. PY is the Python of the environment moe_adapt is installed in.
PY ?= python

.PHONY: check test bench demo

check:  ## lint, format check, type check
	$(PY) -m ruff check .
	$(PY) -m ruff format --check moe_adapt tests
	$(PY) -m mypy

test:  ## the CPU test suite (GPU tests skip without CUDA)
	$(PY) -m pytest -q --durations=30

demo:  ## the CPU demo
	$(PY) -m moe_adapt +recipe=tiny

bench:  ## benchmarks (not run in CI; minutes, several GiB of disk)
	$(PY) tests/benchmarks/bench_upcycle.py
	$(PY) tests/benchmarks/bench_data.py
