# The two set-up commands of the README: `make demo` and `make test`. Both install into .venv first.
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test lint bootstrap

bootstrap:
	@scripts/bootstrap

# The main job: stylise the example photos after the example style (downloads the default models once).
demo: bootstrap
	$(BIN)/stylekit stylize examples/content --style examples/style/mosaic.jpg -o out/demo

# The whole test suite, offline, on tiny random-weight models.
test: bootstrap
	$(BIN)/python -m pytest -q

lint: bootstrap
	$(BIN)/ruff check src tests benchmarks && $(BIN)/ruff format --check src tests benchmarks
