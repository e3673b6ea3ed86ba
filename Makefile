# Mindchart: the README's two commands, plus lint and bench.
SHELL := /bin/bash
export UV_PYTHON_DOWNLOADS ?= never
UV ?= $(shell command -v uv 2>/dev/null || echo "$(HOME)/.local/bin/uv")

.PHONY: install browser run test soak lint bench bench-quick clean

$(UV):
	@command -v uv >/dev/null 2>&1 || python3 -m pip install --quiet --user uv || python3 -m pip install --quiet --user --break-system-packages uv

install: $(UV)
	$(UV) sync --all-packages --frozen

# Browser tests drive Debian's chromium (Playwright never downloads a browser of its own here).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  ( $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium >/dev/null ) \
	  || echo "warning: chromium could not be installed; browser tests will be skipped"; }

run: install
	$(UV) run --frozen mindchart run

test: install browser
	$(UV) run --frozen python -m pytest

# The resilience suite (tests/resilience, also part of `make test`) with longer loads.
soak: install
	MINDCHART_SOAK=1 $(UV) run --frozen python -m pytest tests/resilience -rA

lint: install
	$(UV) run --frozen ruff check .
	$(UV) run --frozen mypy

bench: install
	$(UV) run --frozen python -m bench

bench-quick: install
	$(UV) run --frozen python -m bench --quick

clean:
	rm -rf .venv var .pytest_cache .ruff_cache .mypy_cache
