# Developer commands. `make up` and `make test` are the README's quickstart.
.PHONY: up test deps fmt lint typecheck pytest

# Options for `labcloud up`, e.g. make up ARGS="--advertise-address 192.0.2.10".
ARGS ?=

up:
	./scripts/ensure-deps.sh
	poetry run labcloud up $(ARGS)

test:
	./scripts/ensure-deps.sh --postgres
	$(MAKE) lint typecheck pytest

deps:
	./scripts/ensure-deps.sh --postgres

fmt:
	poetry run ruff format .
	poetry run ruff check --fix .

lint:
	poetry run ruff format --check .
	poetry run ruff check .

typecheck:
	poetry run mypy .

pytest:
	poetry run pytest
