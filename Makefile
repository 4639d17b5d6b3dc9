# The two commands a newcomer needs: `make demo` (the main job) and `make test` (the suite).
# Both create .venv/ at the repo root when it is missing and install edgeflex into it.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.edgeflex-installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[export,dev,bench,tvm,fleet,cross]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/edgeflex demo

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(PY) benchmarks/bench_foundation.py --out benchmarks/RESULTS.md
	$(PY) benchmarks/bench_elastic.py --out benchmarks/RESULTS.md
	$(PY) benchmarks/bench_tvm.py --out benchmarks/RESULTS.md

clean:
	rm -rf $(VENV) edgeflex-demo

# Issue 5: run aarch64 (rpi5) TVM engines on an emulated arm64 board (QEMU user mode, Cortex-A76) and compare
# with this host. Builds the board into .board/ on first use (~660 MB); needs Debian's qemu-user-static,
# debootstrap, and g++-aarch64-linux-gnu or the ziglang wheel (edgeflex[cross]). tests/test_board.py and
# tests/test_board_fleet.py (in `make test` too) skip until it is built.
.PHONY: board-test
board-test: $(STAMP)
	$(PY) -m edgeflex.devices.board build
	$(PY) -m pytest -q -s -p no:logging tests/test_board.py tests/test_board_fleet.py
