# The two commands: `make demo` and `make test`. Both install what they need first.
.PHONY: deps demo test lint unit fuzz e2e bench clean

deps:
	@bash scripts/install-deps.sh

demo:
	@bash scripts/demo.sh

lint: deps
	.venv/bin/ruff check vmkit tests bench
	.venv/bin/ruff format --check vmkit tests bench
	.venv/bin/mypy

# Includes tests/fuzz: the whole API fuzzed from its OpenAPI document (fixed seed, about a minute).
test: deps lint
	.venv/bin/python -m pytest -q -p no:cacheprovider

unit: deps
	.venv/bin/python -m pytest -q tests/unit

fuzz: deps
	.venv/bin/python -m pytest -q -p no:cacheprovider tests/fuzz

bench: deps
	.venv/bin/python bench/lifecycle.py
	.venv/bin/python bench/concurrent_start.py
	.venv/bin/python bench/metrics.py
	.venv/bin/python bench/ui.py
	.venv/bin/python bench/console_echo.py
	.venv/bin/python bench/storage.py
	.venv/bin/python bench/network.py
	.venv/bin/python bench/snapshots.py
	.venv/bin/python bench/migration.py
	.venv/bin/python bench/debian.py
