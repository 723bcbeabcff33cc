# Keyward. The two commands a user needs: `make run` and `make test`.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV   := .venv
STAMP  := $(VENV)/.installed
WASM   := dist/keyward.wasm
NATIVE := dist/native/libkeyward.so
CLI    := target/release/keyward
GIT_HASH := $(shell git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)

.PHONY: help build wasm native native-aarch64 cli deps run test unit lint integration bench icount clean fuzz fuzz-smoke profile

help:
	@echo "make run    start a local gateway (OpenBao + demo vendor + Envoy with keyward on 127.0.0.1:10000)"
	@echo "make test   unit tests, lints and integration tests against real Envoy, OpenBao and moto"
	@echo "make build  dist/keyward.wasm, the native module $(NATIVE) and the keyward CLI ($(CLI))"
	@echo "            (make run KEYWARD_EXECUTOR=native runs the native module instead of the wasm filter)"
	@echo "make native-aarch64  the native module cross-built for arm64 (dist/native/aarch64/, zig from PyPI)"
	@echo "make bench  Keyward vs bare Envoy, a no-op wasm filter and Envoy's native filters (bench/results/latest.json)"
	@echo "make icount instructions per request of each bench arm, under callgrind (bench/results/icount.json)"
	@echo "make fuzz   cargo-fuzz on the token, rules, config and cost parsers (FUZZ_SECS per target, default 300)"
	@echo "make profile instructions per function of the warm request path, under callgrind (needs valgrind)"

# --- toolchain and pinned components ---------------------------------------------------------
.wasm-target:
	@rustup target list --installed 2>/dev/null | grep -qx wasm32-wasip1 || rustup target add wasm32-wasip1
	@touch $@

$(STAMP): integration/requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r integration/requirements.txt
	@touch $@

# promtool checks the shipped alert rules and dashboard queries. Debian's `prometheus` package,
# pinned, unpacked into .tools (no service installed, no root needed where apt's lists exist).
PROMTOOL := .tools/bin/promtool
PROMETHEUS_DEB := 2.42.0+ds-5+b6
$(PROMTOOL):
	@mkdir -p .tools/deb .tools/bin
	cd .tools/deb && rm -f prometheus_*.deb && (apt-get download -q prometheus=$(PROMETHEUS_DEB) || (apt-get update -q && apt-get download -q prometheus=$(PROMETHEUS_DEB))) && dpkg-deb -x prometheus_*.deb x
	ln -sf ../deb/x/usr/bin/promtool $@
	$@ --version | head -1

deps: .wasm-target $(STAMP) $(PROMTOOL)

# --- build -----------------------------------------------------------------------------------
# The module is built with the size-optimised `wasm` profile, then shrunk by binaryen's wasm-opt
# (pinned in tools/binaryen, installed from the npm registry). Without npm it ships unshrunk.
comma := ,
WASM_OPT := tools/binaryen/node_modules/.bin/wasm-opt
WASM_FEATURES := --enable-bulk-memory --enable-sign-ext --enable-mutable-globals --enable-nontrapping-float-to-int

# The proxy-wasm callbacks the filter implements. The SDK exports every callback, and Envoy enters
# the VM for each one a module exports (on_log, on_response_body, on_done ... on every request);
# tools/trim_exports.py keeps only these, and wasm-opt then drops the code behind the others.
WASM_EXPORTS := memory _initialize 'proxy_abi_version_*' proxy_on_memory_allocate proxy_on_context_create \
  proxy_on_vm_start proxy_on_configure proxy_on_tick proxy_on_queue_ready proxy_on_http_call_response \
  proxy_on_request_headers proxy_on_request_body proxy_on_request_trailers proxy_on_response_headers proxy_on_response_body proxy_on_response_trailers proxy_on_delete
# $(call finish_wasm,built.wasm,out.wasm): trim the exports, then shrink with wasm-opt if present.
define finish_wasm
	@mkdir -p $(dir $(2))
	python3 tools/trim_exports.py $(1) $(2).trimmed $(WASM_EXPORTS)
	@if [ -x $(WASM_OPT) ]; then \
	  $(WASM_OPT) -Oz $(WASM_FEATURES) $(2).trimmed -o $(2); rm -f $(2).trimmed; \
	else \
	  echo "warning: npm not found: $(2) is not shrunk by wasm-opt"; mv $(2).trimmed $(2); \
	fi
endef

wasm: .wasm-target
	KEYWARD_GIT_HASH=$(GIT_HASH) cargo build --profile wasm --locked --target wasm32-wasip1 -p keyward-filter
	@if [ ! -x $(WASM_OPT) ] && command -v npm >/dev/null; then (cd tools/binaryen && npm ci --silent --no-audit --no-fund); fi
	$(call finish_wasm,target/wasm32-wasip1/wasm/keyward_filter.wasm,$(WASM))
	@echo "built $(WASM) ($$(stat -c %s $(WASM)) bytes, $(GIT_HASH))"

cli:
	cargo build --release --locked -p keyward-cli

# The native executor: the same core as an Envoy dynamic module (Linux; the host's architecture).
# Envoy finds it as lib<name>.so under ENVOY_DYNAMIC_MODULES_SEARCH_PATH (dist/native).
# A running Envoy maps the library: it is replaced by a rename (a new file), never rewritten in
# place, and only when it changed.
define install_so
	@mkdir -p $(dir $(2))
	@cmp -s $(1) $(2) || { cp $(1) $(2).tmp && mv -f $(2).tmp $(2) && echo "installed $(2)"; }
endef

# Envoy's dynamic modules are Linux shared libraries: elsewhere (a Mac running func-e) the wasm
# filter is the executor, and `make build` skips the module.
ifeq ($(shell uname -s),Linux)
native:
	KEYWARD_GIT_HASH=$(GIT_HASH) cargo build --profile native --locked -p keyward-native
	$(call install_so,target/native/libkeyward.so,$(NATIVE))
	@echo "built $(NATIVE) ($$(stat -c %s $(NATIVE)) bytes, $(GIT_HASH))"
else
native:
	@echo "the native module is built on Linux only (Envoy's dynamic modules); skipped"
endif

# The module for arm64 gateways (Graviton), cross-built with zig as the linker (glibc 2.28, as
# Envoy's own images), into dist/native/aarch64/. Checked: it exports and imports exactly the
# Envoy symbols the host build does. The gateway image builds it natively on an arm64 builder.
ZIGVENV := .tools/zig
native-aarch64:
	@test -x $(ZIGVENV)/bin/cargo-zigbuild || { python3 -m venv $(ZIGVENV) && $(ZIGVENV)/bin/pip install --quiet --disable-pip-version-check ziglang==0.17.1 cargo-zigbuild==0.24.1; }
	rustup target add aarch64-unknown-linux-gnu
	PATH="$(CURDIR)/$(ZIGVENV)/bin:$$PATH" KEYWARD_GIT_HASH=$(GIT_HASH) cargo zigbuild --profile native --locked -p keyward-native \
	  --target aarch64-unknown-linux-gnu.2.28 --target-dir target/aarch64
	$(call install_so,target/aarch64/aarch64-unknown-linux-gnu/native/libkeyward.so,dist/native/aarch64/libkeyward.so)
	@diff <(nm -D $(NATIVE) | awk '{print $$NF}' | grep envoy_dynamic_module | sort) \
	      <(nm -D dist/native/aarch64/libkeyward.so | awk '{print $$NF}' | grep envoy_dynamic_module | sort) \
	  || { echo "the arm64 module's Envoy symbols differ from the host build's"; exit 1; }
	@echo "built dist/native/aarch64/libkeyward.so (ARM aarch64, the host build's Envoy symbols)"

# Test only: the native module with the panic-test feature, as libkeyward_panic.so (its own name,
# so it can never be loaded as the shipped module).
dist/native/libkeyward_panic.so: $(shell find native/src core/src -name '*.rs') native/Cargo.toml
	cargo build --profile native --locked -p keyward-native --features panic-test --target-dir target/panic-native
	$(call install_so,target/panic-native/native/libkeyward.so,$@)

# Test only: the module with the panic-test feature (a request header makes it panic), built in its
# own target directory so it can never be mistaken for dist/keyward.wasm.
dist/test/keyward-panic.wasm: .wasm-target $(shell find filter/src core/src -name '*.rs') filter/Cargo.toml
	cargo build --release --locked --target wasm32-wasip1 -p keyward-filter --features panic-test --target-dir target/panic-test
	@mkdir -p dist/test
	cp target/panic-test/wasm32-wasip1/release/keyward_filter.wasm $@

build: wasm native cli

# --- run -------------------------------------------------------------------------------------
run: build $(STAMP)
	@scripts/run-local.sh

# --- test ------------------------------------------------------------------------------------
unit:
	cargo test --locked --workspace

lint: .wasm-target
	cargo fmt --all --check
	cargo clippy --locked --workspace --all-targets -- -D warnings
	cargo clippy --locked --target wasm32-wasip1 -p keyward-filter -- -D warnings

# dynalite (npm, pinned in tools/dynalite): DynamoDB with real conditional writes, for the
# fleet-ledger tests.
DYNALITE := tools/dynalite/node_modules/.bin/dynalite
$(DYNALITE): tools/dynalite/package-lock.json
	cd tools/dynalite && npm ci --silent --no-audit --no-fund
	@touch $@

# One suite, both executors: every test runs against the wasm filter, then the native module.
EXECUTORS ?= wasm native
integration: build dist/test/keyward-panic.wasm dist/native/libkeyward_panic.so $(STAMP) $(PROMTOOL) $(DYNALITE)
	@rc=0; for e in $(EXECUTORS); do \
	  echo "== integration tests, $$e executor"; \
	  KEYWARD_EXECUTOR=$$e $(VENV)/bin/python -m pytest integration -q -p no:cacheprovider || rc=1; \
	done; exit $$rc

test: build $(STAMP) unit lint integration fuzz-smoke

# Bench only: ablation builds of the module (filter/Cargo.toml's ablate-* features; see below). Defined
# before the targets whose prerequisites expand it.
ABLATIONS := audit scrub metrics all onekey

# Keyward against bare Envoy, a no-op wasm filter and Envoy's native filters, in one run (about
# 20 minutes; BENCH_RATE, BENCH_SECONDS, BENCH_ROUNDS tune it). Writes bench/results/latest.json.
bench: build $(STAMP) $(DYNALITE) dist/bench/noop.wasm dist/bench/native-noop/libkeyward.so $(foreach a,$(ABLATIONS),dist/bench/ablate-$(a).wasm)
	cargo build --release --locked -p keyward-loadgen
	$(VENV)/bin/python bench/run.py

# Instructions per request of the Envoy worker in each arm and ablation build, under callgrind
# (about 10 minutes; repeatable, unlike time). Writes bench/results/icount.json.
icount: build $(STAMP) dist/bench/noop.wasm dist/bench/native-noop/libkeyward.so $(foreach a,$(ABLATIONS),dist/bench/ablate-$(a).wasm)
	cargo build --release --locked -p keyward-loadgen
	$(VENV)/bin/python bench/icount.py A B C D N M $(foreach a,$(ABLATIONS),$(a)=dist/bench/ablate-$(a).wasm)

# Instruction counts of the warm request path (engine::decide with an in-memory host), per
# function, from callgrind: repeatable on a shared machine, unlike timings.
profile:
	CARGO_PROFILE_RELEASE_STRIP=false CARGO_PROFILE_RELEASE_DEBUG=1 cargo build --release --locked -p keyward-hotpath --target-dir target/profile
	valgrind --tool=callgrind --callgrind-out-file=target/profile/callgrind.out target/profile/release/keyward-hotpath 20000
	callgrind_annotate --inclusive=yes target/profile/callgrind.out | head -40

# Bench only: ablation builds of the module (filter/Cargo.toml's ablate-* features), through the same
# wasm profile and wasm-opt as dist/keyward.wasm, each in its own target directory.
dist/bench/ablate-%.wasm: .wasm-target $(shell find filter/src core/src -name '*.rs') filter/Cargo.toml
	cargo build --profile wasm --locked --target wasm32-wasip1 -p keyward-filter --target-dir target/ablate-$* \
	  --features $(if $(filter all,$*),ablate-audit$(comma)ablate-scrub$(comma)ablate-metrics,ablate-$*)
	$(call finish_wasm,target/ablate-$*/wasm32-wasip1/wasm/keyward_filter.wasm,$@)

# Bench only: the native module with stream hooks that do nothing (icount's arm M), under the
# module's own name in its own directory.
dist/bench/native-noop/libkeyward.so: $(shell find native/src -name '*.rs') native/Cargo.toml
	cargo build --profile native --locked -p keyward-native --features bench-noop --target-dir target/noop-native
	$(call install_so,target/noop-native/native/libkeyward.so,$@)

dist/bench/noop.wasm: .wasm-target bench/noop/src/lib.rs bench/noop/Cargo.toml
	cargo build --release --locked --target wasm32-wasip1 -p keyward-bench-noop
	@mkdir -p dist/bench
	cp target/wasm32-wasip1/release/keyward_bench_noop.wasm $@

clean:
	rm -rf dist target $(VENV) .wasm-target .run .tools .fuzz fuzz/target tools/binaryen/node_modules tools/dynalite/node_modules examples/node/node_modules

# --- fuzz ------------------------------------------------------------------------------------
# cargo-fuzz (libFuzzer) on the token, rules and config parsers. It needs nightly compiler flags;
# RUSTC_BOOTSTRAP=1 lets the pinned stable toolchain accept them. New inputs go to .fuzz/<target>;
# the committed seed corpus in fuzz/corpus/<target> is only read. Crashes land in fuzz/artifacts/.
CARGO_FUZZ  := .tools/bin/cargo-fuzz
FUZZ_TARGETS := token rules config cost
FUZZ_SECS   ?= 300

$(CARGO_FUZZ):
	cargo install cargo-fuzz --locked --version 0.13.2 --root .tools

fuzz: $(CARGO_FUZZ)
	@for t in $(FUZZ_TARGETS); do \
	  mkdir -p .fuzz/$$t; \
	  echo "== fuzz $$t for $(FUZZ_SECS) s"; \
	  (cd fuzz && RUSTC_BOOTSTRAP=1 ../$(CARGO_FUZZ) run $$t ../.fuzz/$$t corpus/$$t -- \
	      -max_total_time=$(FUZZ_SECS) -max_len=4096 -print_final_stats=1) 2>&1 | grep -E "^(Done|stat::number_of_executed_units|stat::peak_rss)|ERROR|panicked|assertion|left:|right:|SUMMARY|Test unit written" ; \
	  test $${PIPESTATUS[0]} -eq 0 || exit 1; \
	done

# The short run `make test` (and CI) does: every target builds and runs 10 s.
fuzz-smoke:
	@$(MAKE) --no-print-directory fuzz FUZZ_SECS=10

