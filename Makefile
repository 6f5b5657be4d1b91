# Shortcuts for the common jobs. Everything here runs with only the Rust toolchain,
# except the container targets, which need Docker.

AGENCIES ?= 5
CARGO ?= cargo

.PHONY: build test lint fmt bench demo demo-real data secrets server compose console image up down logs

build:
	$(CARGO) build --release

test:
	$(CARGO) test

lint:
	$(CARGO) fmt --check
	$(CARGO) clippy --all-targets -- -D warnings

fmt:
	$(CARGO) fmt

bench:
	$(CARGO) bench

demo:
	$(CARGO) run --release -- demo

# The real agency files, when ../shared/data is beside this checkout.
demo-real:
	$(CARGO) run --release -- demo --data-dir ../shared/data

data:
	$(CARGO) run --release -- gen-data --out .data --agencies $(AGENCIES)

server:
	$(CARGO) run --release -- server

# Regenerate compose.yaml for AGENCIES agencies (containers client1 … clientN), and
# complete ./secrets for them (git-ignored; existing secrets are kept).
compose:
	$(CARGO) run --release -- compose --agencies $(AGENCIES) --out compose.yaml

# The secrets compose.yaml mounts (and the by-hand run uses): one per agency, the
# operator's, and the central's file of them all, in ./secrets (git-ignored).
secrets:
	$(CARGO) run --release -- secrets --agencies $(AGENCIES)

# The server with tokio-console support; connect with `tokio-console` (port 6669).
console:
	RUSTFLAGS="--cfg tokio_unstable" $(CARGO) run --release --features console -- server

image:
	docker build -t lottery:latest .

up: data secrets
	docker compose up -d

down:
	docker compose down --timeout 10

logs:
	docker compose logs -f
