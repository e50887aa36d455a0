# Developer commands. `make up` and `make test` are the README's quickstart.
.PHONY: up test deps fmt lint typecheck pytest

up:
	./scripts/ensure-deps.sh
	poetry run labcloud up

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
