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
	@echo "sluice server on 127.0.0.1:8889, user demo / password demo at 1M (1 MiB/s). Try:"
	@echo "  curl -x socks5h://demo:demo@127.0.0.1:8889 https://example.com/ -o /dev/null -w '%{speed_download} B/s\n'"
	@echo "  curl -x http://demo:demo@127.0.0.1:8889 http://example.com/"
	@echo
	$(BIN) server --db $(DEMO_DB) --listen 127.0.0.1:8889

test:
	$(CARGO) test --release

lint:
	$(CARGO) fmt --check
	$(CARGO) clippy --all-targets -- -D warnings
