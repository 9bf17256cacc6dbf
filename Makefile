# cvmfs-prepub build targets.
CARGO ?= cargo
# Where cargo puts its output (honours CARGO_TARGET_DIR).
TARGET_DIR ?= $(or $(CARGO_TARGET_DIR),target)

.PHONY: build test lint bench fuzz demo run-demo run-sim clean

## build: release binaries into ./bin (cvmfs-prepub, prepubctl), where install.sh takes them
build:
	$(CARGO) build --release --workspace
	mkdir -p bin
	cp $(TARGET_DIR)/release/cvmfs-prepub $(TARGET_DIR)/release/prepubctl bin/

## test: every unit and integration test of the workspace
test:
	$(CARGO) test --workspace

## lint: formatting and clippy with warnings as errors
lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

## bench: the benchmark harness (every performance goal against this machine's limits, written
## to BENCHMARKS.md); BENCH_SKIP=s3,big,receivers shortens it
bench:
	$(CARGO) bench --bench harness

## fuzz: every cargo-fuzz target for FUZZ_SECONDS each (nightly toolchain + cargo-fuzz);
## FUZZ_BUILD=--dev builds them unoptimised (quicker to build, as CI does)
fuzz:
	FUZZ_SECONDS=$(or $(FUZZ_SECONDS),20) FUZZ_BUILD=$(FUZZ_BUILD) scripts/fuzz.sh

## run-demo: start the daemon on config/demo.yaml, publish a sample tar, check it, stop
run-demo: build
	BIN=$(TARGET_DIR)/release scripts/demo-daemon.sh

## run-sim: publisher + gateway double in one process, concurrent communities, chaos on
run-sim:
	$(CARGO) build --bin cvmfs-prepub --example run_sim
	$(CARGO) run --example run_sim -- --jobs 12 --communities 3 --error-rate 0.1 --drop-rate 0.05 --latency 20ms --manifest-lag 1s

## demo: create a repository, publish a sample tar into it, and check it
demo: build
	BIN=$(TARGET_DIR)/release/cvmfs-prepub scripts/demo-publish.sh

clean:
	$(CARGO) clean
