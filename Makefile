# Sluice: `make run` starts a demo server (and local proxy); `make test` runs every test.
CARGO ?= cargo
BIN := target/release/sluice
DEMO_DB := demo.db

.PHONY: run test lint bench build soak

build:
	$(CARGO) build --release

$(DEMO_DB): | build
	SLUICE_PASSWORD=demo $(BIN) user add demo --bandwidth 1M --db $(DEMO_DB)

run: build $(DEMO_DB)
	@echo
	@echo "sluice server on 127.0.0.1:8889 and sluice local on 127.0.0.1:1080, user demo / password demo at 1M."
	@echo "Try (Ctrl-C stops both):"
	@echo "  curl -x socks5h://demo:demo@127.0.0.1:8889 https://example.com/ -o /dev/null -w '%{speed_download} B/s'"
	@echo "  curl --socks5-hostname 127.0.0.1:1080 https://example.com/ -o /dev/null -w '%{speed_download} B/s'"
	@echo "  curl -x http://demo:demo@127.0.0.1:8889 http://example.com/"
	@echo
	SLUICE_PASSWORD=demo $(BIN) local --server 127.0.0.1:8889 --user demo --listen 127.0.0.1:1080 & \
	LOCAL=$$!; trap 'kill $$LOCAL 2>/dev/null' EXIT INT TERM; \
	$(BIN) server --db $(DEMO_DB) --listen 127.0.0.1:8889

# System packages the integration tests drive as real clients; installed with apt-get when missing
# (as root), so `make test` passes on a fresh machine without `.ci/run`.
TEST_PACKAGES := curl:curl wget:wget python3:python3 unshare:util-linux ip:iproute2 \
	redis-server:redis-server redis-cli:redis-tools

test: test-packages
	$(CARGO) test --release

.PHONY: test-packages
test-packages:
	@missing=""; for p in $(TEST_PACKAGES); do cmd=$${p%%:*}; pkg=$${p#*:}; \
		command -v $$cmd >/dev/null 2>&1 || missing="$$missing $$pkg"; done; \
	python3 -c 'import requests' >/dev/null 2>&1 || missing="$$missing python3-requests"; \
	if [ -n "$$missing" ]; then \
		echo "installing test packages:$$missing"; \
		if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
		else echo "make test needs:$$missing (run as root, or: sudo apt-get install$$missing)"; exit 1; fi; fi

lint:
	$(CARGO) fmt --check
	$(CARGO) clippy --all-targets -- -D warnings

# Long leak and flood tests (issue 7), kept out of `make test`.
soak:
	$(CARGO) test --release --test tests -- --ignored --test-threads=1 soak_

# The benchmark (issue 5): release build, then every scenario; prints a Markdown table and writes
# bench-out/latest.md. BENCH_ARGS=--quick runs each scenario once, briefly (a smoke test).
# 9,000 tunnels are 18,000 threads, each with ~4 memory maps: more than the kernel's default
# vm.max_map_count (65530) allows, so the bench raises it when it may (as root); without that,
# the server's default --max-connections stops at what the maps allow (~7,900).
bench: build
	@if [ "$$(id -u)" = 0 ] && [ "$$(cat /proc/sys/vm/max_map_count 2>/dev/null || echo 0)" -lt 262144 ]; then \
		echo 262144 > /proc/sys/vm/max_map_count 2>/dev/null && echo "raised vm.max_map_count to 262144"; fi; true
	$(CARGO) bench --bench sluice-bench -- $(BENCH_ARGS)

# Installs the reference proxies `make bench` compares against (Debian packages; run as root).
# Failures are tolerated: the benchmark runs with whichever peers are present.
.PHONY: bench-peers
bench-peers:
	-apt-get update
	-apt-get install -y microsocks squid dante-server
