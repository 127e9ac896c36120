# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint unit bench clean system

PROTOS := $(wildcard protos/shoal/_gen/*.proto)

# The install compiles protos/ into shoal/_gen (setup.py), so a changed proto
# reinstalls.
$(STAMP): pyproject.toml setup.py $(PROTOS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/shoal demo

lint: $(STAMP)
	$(BIN)/ruff check shoal tests bench
	$(BIN)/ruff format --check shoal tests bench
	$(BIN)/mypy
	$(BIN)/lint-imports

unit: $(STAMP) system
	$(BIN)/pytest

test: lint unit

# What tests need from the system: iptables (capture is tested with real
# rules, inside network namespaces the tests make), curl (what an app in a
# captured Pod calls with) and Debian's python3 (the apps of the injection
# test run as an ordinary user, who cannot enter the virtualenv's Python
# under /root). Installed from Debian's packages when missing; needs root,
# as the capture tests themselves do.
SYSTEM_TOOLS := iptables iptables-restore curl /usr/bin/python3
system:
	@missing=""; for tool in $(SYSTEM_TOOLS); do command -v $$tool >/dev/null || missing=1; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing iptables, curl and python3 (Debian packages) for the capture tests"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iptables curl python3 >/dev/null; \
	fi
	@# Debian's chromium, for the dashboard's browser tests (Playwright cannot
	@# download its own browser here).
	@if [ ! -x /usr/bin/chromium ]; then \
	  echo "installing chromium (Debian package) for the dashboard's browser tests"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	fi
	@# Debian's Prometheus, which the dashboard's Prometheus source is tested
	@# against (it scrapes real sidecars there).
	@if ! command -v prometheus >/dev/null; then \
	  echo "installing prometheus (Debian package) for the dashboard's Prometheus tests"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null; \
	fi
	@# Debian's gcc, which builds the library that shifts one Envoy's clock in
	@# the clock-skew test (Debian's libfaketime deadlocks in Envoy's tcmalloc).
	@if ! command -v cc >/dev/null; then \
	  echo "installing gcc (Debian package) for the clock-skew test"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gcc libc6-dev >/dev/null; \
	fi

bench: $(STAMP)
	$(BIN)/python bench/translate.py

clean:
	rm -rf $(VENV) .shoal .pytest_cache .mypy_cache .ruff_cache
