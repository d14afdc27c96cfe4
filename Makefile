# The two set-up commands of the README: `make demo` and `make test`. Both install into .venv first.
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test lint bootstrap

bootstrap:
	@scripts/bootstrap

# The main job: stylise the example photos after the example style (downloads the models once).
# Without a CUDA GPU it runs the light lcm-sd15 preset and says so (scripts/demo; DEMO_PRESET=NAME).
demo: bootstrap
	@BIN=$(BIN) scripts/demo

# The whole test suite, offline, on tiny random-weight models.
test: bootstrap
	$(BIN)/python -m pytest -q

lint: bootstrap
	$(BIN)/ruff check src tests benchmarks && $(BIN)/ruff format --check src tests benchmarks
