# The README's two commands: `make demo` and `make test`. Both set everything up first.
VENV := .venv/bin
.PHONY: setup setup-tests demo test bench dist

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

# The manylinux2014 abi3 wheel and the sdist in dist/, checked (auditwheel, installed-wheel smoke
# tests, a wheel built from the sdist): scripts/dist.sh.
dist:
	./scripts/setup.sh --dist
	./scripts/dist.sh
