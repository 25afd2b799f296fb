# keybroker — two commands for a new user on Debian: `make run`, `make test`.
DATA      ?= var
CARGO     ?= cargo
BIN       := target/release/keybroker
SUDO      := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# System packages. Running needs SoftHSM (the HSM), OpenSSL's tools and
# pkg-config; the tests also need Prometheus (promtool and the server),
# pip for aiosmtpd (a real SMTP relay), noiseprotocol (an independent
# Noise implementation for the direct channel's vectors) and Grafana's
# foundation SDK (the dashboard's schema), PostgreSQL
# (tests/wallet_pg.rs starts a throwaway cluster) and HAProxy (tests/cluster.rs).
RUN_PACKAGES  := softhsm2 opensc openssl ca-certificates pkg-config
TEST_PACKAGES := $(RUN_PACKAGES) prometheus python3-pip postgresql haproxy
# Grafana has no Debian package here: its foundation SDK builds the
# dashboard (ops/grafana/dashboard.py) and checks it against Grafana's schema.
PIP_PACKAGES  := aiosmtpd noiseprotocol grafana-foundation-sdk

.PHONY: all setup deps deps-run build build-run run serve test lint demo bench bench-ledgers fuzz sim clean

all: build

define apt_install
	@command -v $(CARGO) >/dev/null || { echo "cargo not found: install Rust (https://rustup.rs) first"; exit 1; }
	@missing=""; for p in $(1); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  $(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi
endef

deps-run:
	$(call apt_install,$(RUN_PACKAGES))

deps:
	$(call apt_install,$(TEST_PACKAGES))
	@# For whichever python3 is first on PATH (it may not be Debian's).
	@python3 -c 'import aiosmtpd, noise, grafana_foundation_sdk' 2>/dev/null || python3 -m pip install -q $(PIP_PACKAGES) || python3 -m pip install -q --break-system-packages $(PIP_PACKAGES)

build:
	$(CARGO) build --release --workspace

# Only the appliance's binary: what `make run` needs.
build-run:
	$(CARGO) build --release --bin keybroker

setup: deps build

# The whole appliance under $(DATA)/, idempotently: the HSM token and CAs,
# the demo users and terminals, the reference market (its own process, on
# 127.0.0.1:8443 and 8444, registered with the broker) and a fresh voucher
# per demo user; then the broker on 127.0.0.1:7443 (admin 9464) in the
# foreground. demo-enroll prints the commands to try from a second shell.
# Ctrl-C stops both (the market's log: $(DATA)/market/market.log).
run: deps-run build-run
	$(BIN) --data-dir $(DATA) init
	$(BIN) --data-dir $(DATA) demo-enroll
	@$(BIN) market serve --market-config $(DATA)/market/market.toml > $(DATA)/market/market.log 2>&1 & market=$$!; \
	trap 'kill $$market 2>/dev/null; wait $$market 2>/dev/null' EXIT INT TERM; \
	$(BIN) --config $(DATA)/keybroker.toml --data-dir $(DATA) serve

test: deps
	$(CARGO) test --workspace --all-targets

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	@command -v cargo-deny >/dev/null || $(CARGO) install cargo-deny --locked
	$(CARGO) deny check licenses bans sources

# Drives the demo terminals end to end against an in-process broker and
# ends with one line starting `demo ok:`.
demo: setup
	$(BIN) --data-dir $(DATA) init
	$(BIN) --data-dir $(DATA) demo-enroll
	$(BIN) --data-dir $(DATA) demo

bench: setup
	$(CARGO) run --release -p keybroker-bench -- $(BENCH_ARGS)

# Purchases on each ledger, closed loop, 64 workers for 10 s (one long step
# rather than the peak search: its 3 s steps are too noisy here to compare
# two ledgers): SQLite, then PostgreSQL in a throwaway loopback cluster the
# bench starts and stops. Reports: target/bench/report-sqlite.json and
# report-postgres.json (charts latency-sqlite.svg, latency-postgres.svg).
LEDGER_BENCH := --scenario purchase --closed --workers 64 --duration 10
bench-ledgers:
	$(MAKE) bench BENCH_ARGS="$(LEDGER_BENCH) --ledger sqlite --out target/bench/report-sqlite.json"
	$(MAKE) bench BENCH_ARGS="$(LEDGER_BENCH) --ledger postgres --out target/bench/report-postgres.json"

# Every parser and state machine under libFuzzer for FUZZ_SECONDS each.
# cargo-fuzz needs nightly flags; RUSTC_BOOTSTRAP lets the stable
# toolchain accept them (only this one is installable here).
FUZZ_SECONDS ?= 60
FUZZ_TARGETS := access_frames market_frames direct_records direct_handshake access_session access_conn wallet_blobs
# The deterministic simulation (tests/sim.rs) over more seeds than
# `make test` runs; a failing seed prints the command that replays it.
SEEDS ?= 1000
sim:
	SIM_SEEDS=$(SEEDS) $(CARGO) test --release --test sim -- --nocapture

fuzz:
	@command -v cargo-fuzz >/dev/null || $(CARGO) install cargo-fuzz --locked
	cd fuzz && for t in $(FUZZ_TARGETS); do \
	  mkdir -p corpus/$$t; \
	  RUSTC_BOOTSTRAP=1 $(CARGO) fuzz run $$t corpus/$$t -- -max_total_time=$(FUZZ_SECONDS) -rss_limit_mb=2048 > $$t.log 2>&1 \
	    || { tail -n 40 $$t.log; echo "fuzz target $$t failed"; exit 1; }; \
	  grep -E '^Done' $$t.log; \
	done

clean:
	rm -rf target/bench
