# The README's two commands: `make demo` and `make test`. Both set everything up first.
VENV := .venv/bin
.PHONY: setup setup-tests demo test bench

setup:
	./scripts/setup.sh

setup-tests:
	./scripts/setup.sh --tests

demo: setup
	$(VENV)/vvu demo

test: setup-tests
	./scripts/test.sh

bench: setup-tests
	./scripts/bench.sh
