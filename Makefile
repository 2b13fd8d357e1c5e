# Two commands for a newcomer: `make demo` and `make test`. Both create .venv and install from
# constraints.txt (the tested versions; torch pinned to the CPU build 2.13.0) when needed.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
WORKDIR ?= demo_workdir
# Optional extra pip arguments, e.g. PIP_EXTRA="--extra-index-url https://download.pytorch.org/whl/cpu"
PIP_EXTRA ?=
PYTEST_ARGS ?=

.PHONY: install demo test bench-fusion bench-skab bench-scale clean

$(BIN)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -qq --upgrade "pip>=24"
	$(BIN)/python -m pip install -qq -c constraints.txt $(PIP_EXTRA) -e ".[dev,bench]"
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/dmafn demo --workdir $(WORKDIR)

test: install
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

bench-fusion: install
	$(BIN)/python -m benchmarks.fusion_pays --out benchmarks/results

bench-skab: install
	@test -n "$(SKAB)" || (echo "usage: make bench-skab SKAB=path/to/skab" && exit 2)
	$(BIN)/python -m benchmarks.skab $(SKAB) --out benchmarks/results

bench-scale: install
	$(BIN)/python -m benchmarks.scale --out benchmarks/results

clean:
	rm -rf $(VENV) $(WORKDIR) .pytest_cache
