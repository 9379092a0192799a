# The two commands of the README's quick start, and the helpers around them.
PYTHON ?= python3
export HF_HUB_OFFLINE ?= 1

.PHONY: install demo test test-all lint typecheck format docs docs-build

install:
	$(PYTHON) -m pip install -q -e '.[dev]'

demo: install
	$(PYTHON) -m protoseg.cli demo

test: install
	$(PYTHON) -m pytest -q -m "not slow"

test-all: install
	$(PYTHON) -m pytest -q

lint:
	ruff check protoseg tests benchmarks
	ruff format --check protoseg tests benchmarks

typecheck: install
	$(PYTHON) -m mypy

format:
	ruff format protoseg tests benchmarks
	ruff check --fix protoseg tests benchmarks

# The documentation site (docs/, mkdocs.yml): served with live reload while editing, and
# built with every warning (a broken link or anchor, a page outside the nav) an error.
docs: install
	NO_MKDOCS_2_WARNING=1 $(PYTHON) -m mkdocs serve

docs-build: install
	NO_MKDOCS_2_WARNING=1 $(PYTHON) -m mkdocs build --strict
