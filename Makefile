# The README's two commands: `make demo` and `make test`. Both set everything up first.
VENV := .venv/bin
.PHONY: setup demo test test-rust test-python lint bench

setup:
	./scripts/setup.sh

demo: setup
	$(VENV)/vvu demo

test: setup
	./scripts/test.sh

bench: setup
	./scripts/bench.sh
