# aoai-gateway: `make run` (the demo) and `make test` (everything CI runs) do all set-up.
CARGO ?= cargo
PYTHON ?= python3
export OPENSSL_NO_VENDOR := 1

.PHONY: all deps build release run test unit lint integration bench check-demo fuzz fuzz-ci fuzz-replay clean

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

## Formatting, lints, unit and filter tests, the integration tests against the real binary, then
## every fuzz target for 30 s (its seeds and saved findings replayed first).
test: build lint unit integration fuzz-ci

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

## Every fuzz target (fuzz/, nightly, libFuzzer) for FUZZ_SECONDS each; fails on any finding.
FUZZ_SECONDS ?= 600
fuzz: deps
	./scripts/fuzz.sh $(FUZZ_SECONDS)

## The same, 30 s per target.
fuzz-ci: deps
	./scripts/fuzz.sh 30

## Replays the fuzz seeds and saved findings through every check (stable, no libFuzzer).
fuzz-replay:
	$(CARGO) test --manifest-path fuzz/Cargo.toml --locked

check-demo: build
	AOAI_SWEDEN_KEY=x ./target/debug/aoai-gateway check -c conf/demo.yaml

clean:
	$(CARGO) clean
