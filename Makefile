# margin: two commands matter. `make demo` sets up and runs the demo; `make test` sets up and tests.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install install-base install-local services demo stop test lint typecheck bench soak clean
.PHONY: llama-server bench-selfhosted browser focus

install: install-base install-local llama-server ## .venv with every extra (compiles llama.cpp once: ~12 min on 2 cores)

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip wheel

install-base: $(VENV)/.base
$(VENV)/.base: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[dev,otel,plots,semantic]'
	@touch $@

install-local: $(VENV)/.local
$(VENV)/.local: $(VENV)/.base
	@bash scripts/install-local.sh $(BIN)
	@touch $@

llama-server: .margin/bin/llama-server ## the real llama.cpp server for the self-hosted pool tests (built offline once)
.margin/bin/llama-server: | $(VENV)/.base
	@bash scripts/build-llama-server.sh $(BIN)

services: ## make sure PostgreSQL and Redis answer on loopback (installs/starts them if needed)
	@bash scripts/services.sh

browser: ## Debian's chromium for the dashboard's browser tests (Playwright never downloads one)
	@command -v chromium >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

focus: install-base ## the FOCUS 1.2 export checked by focus-validator 2.2.1 (its own Python 3.12 venv)
	bash scripts/focus-validate.sh

demo: install-base services
	@if [ "$${MARGIN_DEMO_LOCAL:-1}" != "0" ]; then $(MAKE) --no-print-directory install-local; fi
	$(BIN)/python scripts/demo.py

stop: ## stop what `make demo` left running
	-$(BIN)/python scripts/demo.py --stop

lint: install-base
	$(BIN)/ruff check src tests bench scripts

typecheck: install-base
	$(BIN)/mypy

test: install services browser lint typecheck
	MARGIN_REQUIRE_LOCAL=1 $(BIN)/python -m pytest -q -p no:cacheprovider
	bash scripts/focus-validate.sh

bench: install-base services
	bash bench/setup_litellm.sh
	$(BIN)/python bench/overhead.py --out BENCHMARKS.md
	$(BIN)/python bench/budget_overhead.py --out BENCHMARKS.md

bench-selfhosted: install-local llama-server ## least-loaded vs round-robin over two real llama.cpp servers
	$(BIN)/python bench/selfhosted_balance.py --out BENCHMARKS.md

soak: install-base services
	$(BIN)/python bench/overhead.py --rps 500 --duration 600 --rounds 1 --targets direct,margin
	$(BIN)/python bench/soak.py --out BENCHMARKS.md

.PHONY: audit
audit: install-base ## known vulnerabilities in the installed, pinned dependencies (needs PyPI's JSON API)
	$(BIN)/pip-audit --progress-spinner off --skip-editable --strict

clean:
	rm -rf $(VENV) .venv-litellm .margin build dist src/*.egg-info
