# Two commands matter: `make demo` and `make test`. Both build .venv themselves.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint typecheck unit bench clean monitoring

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/syncd demo

test: $(STAMP) lint typecheck monitoring
	$(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff check syncd tests $(wildcard bench)
	$(BIN)/ruff format --check syncd tests $(wildcard bench)

typecheck: $(STAMP)
	$(BIN)/mypy

# The alert rules' unit tests (deploy/monitoring/alerts.test.yml). promtool comes from
# Debian's `prometheus` package: installed here when missing and apt-get can (root), so
# `make test` passes on a fresh Debian machine; otherwise it fails, never a silent skip.
PROMTOOL ?= promtool
monitoring:
	@command -v $(PROMTOOL) >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	      --no-install-recommends prometheus >/dev/null; }; } || true
	@command -v $(PROMTOOL) >/dev/null 2>&1 || { \
	  echo "make monitoring: '$(PROMTOOL)' not found; install it with" \
	       "'apt-get install prometheus' (Debian) or set PROMTOOL=/path/to/promtool" >&2; \
	  exit 1; }
	$(PROMTOOL) check config deploy/monitoring/prometheus.yml
	$(PROMTOOL) check rules deploy/monitoring/alerts.yml
	$(PROMTOOL) test rules deploy/monitoring/alerts.test.yml

bench: $(STAMP)
	$(BIN)/python bench/bench_sync.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
