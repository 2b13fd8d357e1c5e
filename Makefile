# Two commands for a newcomer: `make demo` and `make test`. Both create .venv and install from
# constraints.txt (the tested versions; torch pinned to the CPU build 2.13.0) when needed.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
WORKDIR ?= demo_workdir
# Optional extra pip arguments, e.g. PIP_EXTRA="--extra-index-url https://download.pytorch.org/whl/cpu"
PIP_EXTRA ?=
PYTEST_ARGS ?=

.PHONY: install browser demo test test-slow bench-fusion bench-skab bench-scale bench-evaluate bench-calibrate bench-profile bench-shard-reads bench-row-group-reads bench-train-features bench-entity-statistics bench-train-statistics bench-relation-width bench-dead-tags bench-dead-tag-relations bench-smoothing bench-small-validation images clean

$(BIN)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -qq --upgrade "pip>=24"
	$(BIN)/python -m pip install -qq -c constraints.txt $(PIP_EXTRA) -e ".[dev,bench]"
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/dmafn demo --workdir $(WORKDIR)

# The report page's test opens it in headless Chromium: Debian's chromium package, installed when missing
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || { \
	  echo "installing Debian's chromium (the report page is tested in a real browser)"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium >/dev/null; }

# `make test` leaves out the checks marked slow (each a minute or more: a 2-node cluster under `ray job submit`, a
# Train worker killed mid-run, a classifier trained through Ray Train); `make test-slow` runs those. CI runs both.
test: install browser
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

test-slow: install
	$(BIN)/python -m pytest -q -m slow $(PYTEST_ARGS)

bench-fusion: install
	$(BIN)/python -m benchmarks.fusion_pays --out benchmarks/results

bench-small-validation: install
	$(BIN)/python -m benchmarks.small_validation --out benchmarks/results

bench-skab: install
	@test -n "$(SKAB)" || (echo "usage: make bench-skab SKAB=path/to/skab" && exit 2)
	$(BIN)/python -m benchmarks.skab $(SKAB) --out benchmarks/results

bench-scale: install
	$(BIN)/python -m benchmarks.scale --out benchmarks/results

bench-evaluate: install
	$(BIN)/python -m benchmarks.evaluate_window --out benchmarks/results

bench-calibrate: install
	$(BIN)/python -m benchmarks.calibrate_window --out benchmarks/results

bench-profile: install
	$(BIN)/python -m benchmarks.profile_day --out benchmarks/results

bench-shard-reads: install
	$(BIN)/python -m benchmarks.shard_reads --out benchmarks/results
	$(BIN)/python -m benchmarks.shard_reads --shard-mb 16 --out benchmarks/results

bench-row-group-reads: install
	$(BIN)/python -m benchmarks.row_group_reads --out benchmarks/results
	$(BIN)/python -m benchmarks.row_group_reads --buckets 16 --out benchmarks/results

bench-entity-statistics: install
	$(BIN)/python -m benchmarks.entity_statistics --out benchmarks/results

bench-train-statistics: install
	$(BIN)/python -m benchmarks.train_statistics --out benchmarks/results

bench-relation-width: install
	$(BIN)/python -m benchmarks.relation_width --out benchmarks/results

bench-dead-tags: install
	$(BIN)/python -m benchmarks.dead_tags --out benchmarks/results

bench-dead-tag-relations: install
	$(BIN)/python -m benchmarks.dead_tag_relations --out benchmarks/results

bench-smoothing: install
	$(BIN)/python -m benchmarks.smoothing --out benchmarks/results

bench-train-features: install
	$(BIN)/python -m benchmarks.train_features --out benchmarks/results $(if $(BASELINE),--baseline $(BASELINE))

# The cluster images (ray_cluster.yaml, infra/k8s): make images REGISTRY=ghcr.io/your-org [PUSH=1]
REGISTRY ?= ghcr.io/your-org
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
images:
	docker build -f infra/Dockerfile -t $(REGISTRY)/dmafn:cpu-$(VERSION) .
	docker build -f infra/Dockerfile.cuda -t $(REGISTRY)/dmafn:cuda-$(VERSION) .
	if [ -n "$(PUSH)" ]; then docker push $(REGISTRY)/dmafn:cpu-$(VERSION) && docker push $(REGISTRY)/dmafn:cuda-$(VERSION); fi

clean:
	rm -rf $(VENV) $(WORKDIR) .pytest_cache
