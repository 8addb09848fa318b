# aoai-gateway: `make run` (the demo) and `make test` (everything CI runs) do all set-up.
CARGO ?= cargo
PYTHON ?= python3
export OPENSSL_NO_VENDOR := 1

.PHONY: all deps build release run test unit lint integration bench check-demo clean

all: build

deps:
	./scripts/install-deps.sh

build: deps
	$(CARGO) build --workspace --locked

release: deps
	$(CARGO) build --workspace --release --locked

## The gateway on conf/demo.yaml in front of aoai-mock; prints a curl line and an SDK snippet.
run: release
	./scripts/run-demo.sh target/release

## Formatting, lints, unit and filter tests, then the integration tests against the real binary.
test: build lint unit integration

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings

unit:
	$(CARGO) test --workspace --locked

integration:
	AGW_BIN_DIR=$(CURDIR)/target/debug $(PYTHON) -m pytest tests/integration -q -p no:cacheprovider

## Gateway vs bare nginx on this machine (see load-tests/README.md).
bench: release
	./load-tests/bench.sh

check-demo: build
	AOAI_SWEDEN_KEY=x ./target/debug/aoai-gateway check -c conf/demo.yaml

clean:
	$(CARGO) clean
