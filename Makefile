# estargz-snapshotter: build, test, install.
#
#   make test     install what the tests need (Debian packages, Rust components), then run
#                 formatting, lint and every test (unit, property, interop with ctr-remote)
#   make demo     the main job: python started from a lazily pulled image, vs. an ordinary pull
#   make bench    every benchmark (time to ready, conversion, memory); see BENCHMARKS.md
#   make bench-quick  a subset in a few minutes
#   make fuzz     long fuzzing of the parsers (FUZZ_CASES cases per property)
#   make upgrade-test  an older build (UPGRADE_FROM) upgraded to this one with a reader running
#   make build    release binaries in target/release
#   make install  binaries into $(PREFIX)/bin, the systemd unit, and an example config
#                 (kept if one exists) into /etc/estargz-snapshotter/config.toml

SHELL  := /bin/bash
CARGO  ?= cargo
PREFIX ?= /usr/local
# Cases per property test; raise for a longer fuzzing run (e.g. make test PROPTEST_CASES=100000).
PROPTEST_CASES ?= 512
export PROPTEST_CASES

.PHONY: all build test deps crate-graph upgrade-test lint check-fmt unit demo install clean bench bench-quick bench-venv fuzz image

all: build

build:
	$(CARGO) build --release --workspace

# The node image of the Kubernetes DaemonSet (deploy/kubernetes/): an OCI layout at
# target/image, tagged with the crate version. Push it with skopeo.
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)
image: build
	bash testdata/scripts/node-image.sh target/image $(VERSION)
	@echo "push with: skopeo copy oci:target/image:$(VERSION) docker://REGISTRY/estargz-snapshotter:$(VERSION)"

deps:
	bash testdata/scripts/install-deps.sh

check-fmt:
	$(CARGO) fmt --all -- --check

lint:
	$(CARGO) clippy --workspace --all-targets -- -D warnings

# Runs every test and ends with one summary line over all test binaries.
unit:
	@mkdir -p target
	set -o pipefail; $(CARGO) test --workspace --no-fail-fast 2>&1 | tee target/test.log
	@awk '/^test result:/ {p += $$4; f += $$6} END {printf "%d passed, %d failed\n", p, f}' target/test.log

# ARCHITECTURE.md's crate-graph block must match the workspace's dependencies (cargo metadata).
crate-graph:
	CARGO=$(CARGO) bash testdata/scripts/crate-graph.sh

test: deps crate-graph check-fmt lint unit

# Longer fuzzing of the footer, TOC and chunk parsers: the property tests (optimised build)
# with FUZZ_CASES cases each; prints the time taken. Failures are kept by proptest in
# crates/estargz-format/tests/properties.proptest-regressions and rerun by every make test.
FUZZ_CASES ?= 2000000
fuzz:
	time PROPTEST_CASES=$(FUZZ_CASES) $(CARGO) test --release -p estargz-format --test properties

demo:
	bash testdata/scripts/demo.sh

# An older build's daemon and FUSE manager replaced by this build's daemon, with a reader
# running (builds UPGRADE_FROM from git history once: ~4 min).
UPGRADE_FROM ?= 68ec092
upgrade-test:
	CARGO=$(CARGO) bash testdata/scripts/upgrade-test.sh $(UPGRADE_FROM)

# Benchmarks print Markdown tables; results and plots land in benches/results/.
BENCH_PY := target/bench-venv/bin/python

# A failing benchmark must fail the target, not hide behind tee.
bench bench-quick: SHELL := /bin/bash
bench bench-quick: .SHELLFLAGS := -eo pipefail -c

bench-venv:
	@[ -x $(BENCH_PY) ] || { python3 -m venv target/bench-venv && target/bench-venv/bin/pip install -q matplotlib; }

bench: deps build bench-venv
	mkdir -p benches/results
	python3 benches/link_throughput.py --links 1gbit | tee benches/results/link_throughput_1gbit.md
	python3 benches/time_to_ready.py --samples 5 --out benches/results | tee benches/results/time_to_ready.md
	$(BENCH_PY) benches/plot.py benches/results/time_to_ready.json benches/results/time_to_ready.png
	python3 benches/reads.py --samples 3 --out benches/results | tee benches/results/reads.md
	python3 benches/time_to_ready.py --samples 1 --workloads model --modes ordinary,lazy,ref \
		--out benches/results/model | tee benches/results/time_to_ready_model.md
	MODEL_BYTES=536870912 python3 benches/reads.py --image model --samples 2 --random-reads 30 \
		--links 100mbit,loopback --out benches/results/model | tee benches/results/reads_model.md
	python3 benches/scale.py --samples 3 --out benches/results | tee benches/results/scale.md
	bash benches/convert.sh 3 | tee benches/results/convert.md
	$(CARGO) bench -q -p estargz-layerfs --bench toc_memory | tee benches/results/toc_memory.md
	rm -rf target/criterion
	$(CARGO) bench -q -p estargz-format --bench format
	$(CARGO) bench -q -p estargz-layerfs --bench lookup
	python3 benches/criterion_table.py target/criterion | tee benches/results/micro.md
	@echo; echo "== all results (benches/results/) =="; cat benches/results/*.md

bench-quick: deps build bench-venv
	mkdir -p target/bench
	python3 benches/time_to_ready.py --samples 2 --workloads python3,python-imports --links 100mbit \
		--modes ordinary,lazy,ref,lazy-prio,ref-prio,lazy-opt,ref-opt --out target/bench | tee target/bench/time_to_ready.md
	$(BENCH_PY) benches/plot.py target/bench/time_to_ready.json target/bench/time_to_ready.png
	python3 benches/reads.py --samples 1 --links loopback --out target/bench | tee target/bench/reads.md

SYSTEMD_DIR ?= /etc/systemd/system

install: build
	install -D -m 0755 target/release/estargz $(DESTDIR)$(PREFIX)/bin/estargz
	install -D -m 0755 target/release/estargz-snapshotter $(DESTDIR)$(PREFIX)/bin/estargz-snapshotter
	sed 's|/usr/local/bin/|$(PREFIX)/bin/|' systemd/estargz-snapshotter.service > target/estargz-snapshotter.service
	install -D -m 0644 target/estargz-snapshotter.service $(DESTDIR)$(SYSTEMD_DIR)/estargz-snapshotter.service
	install -D -m 0644 README.md $(DESTDIR)$(PREFIX)/share/doc/estargz-snapshotter/README.md
	@if [ -e $(DESTDIR)/etc/estargz-snapshotter/config.toml ]; then \
		echo "keeping $(DESTDIR)/etc/estargz-snapshotter/config.toml"; \
	else \
		install -D -m 0644 systemd/config.toml $(DESTDIR)/etc/estargz-snapshotter/config.toml; \
	fi

clean:
	$(CARGO) clean
