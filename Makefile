# Millrace's entry points. The README names two: `make demo` and `make test`.
SHELL := bash
.DEFAULT_GOAL := help

# Cargo builds go to a stable directory outside the work tree, so CI's fresh clone reuses
# the previous build instead of compiling every dependency again.
MILLRACE_CACHE ?= $(HOME)/.cache/millrace
export CARGO_TARGET_DIR ?= $(MILLRACE_CACHE)/target

.PHONY: help setup demo test bench simulate images lint fmt crds cluster-up cluster-down

help:
	@echo "make demo    bring up the local control plane and show Millrace on it"
	@echo "make test    install what is missing, lint, and run every test on the local control plane"
	@echo "make bench   print the benchmarks' figures"
	@echo "make simulate compare scaling strategies on a simulated day"
	@echo "make images  build and check the operator and scorer OCI images (no Docker needed)"
	@echo "make lint    rustfmt and clippy only"
	@echo "make fmt     format the code"
	@echo "make crds    regenerate the CRD, the chart's copy and docs/reference.md from the API types"

setup:
	scripts/setup.sh

demo:
	scripts/demo.sh

test:
	scripts/test.sh

bench:
	scripts/bench.sh

images: setup
	scripts/images.sh

simulate:
	cargo run --quiet --release -p millrace-operator --bin millrace-simulate

lint:
	cargo fmt --all --check
	cargo clippy --workspace --all-targets -- -D warnings
	RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --quiet
	cargo run --quiet -p millrace-crds --bin crdgen -- --check

crds:
	cargo run --quiet -p millrace-crds --bin crdgen

fmt:
	cargo fmt --all

cluster-up: setup
	e2e/cluster up

cluster-down:
	e2e/cluster down
