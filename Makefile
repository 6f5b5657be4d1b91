# Shortcuts for the common jobs. Everything here runs with only the Rust toolchain,
# except the container targets, which need Docker.

AGENCIES ?= 5
CARGO ?= cargo

.PHONY: build test lint fmt bench demo demo-real data secrets server compose console image postgres-image up down logs

build:
	$(CARGO) build --release

test:
	$(CARGO) test

lint:
	$(CARGO) fmt --check
	$(CARGO) clippy --all-targets -- -D warnings
	RUSTDOCFLAGS="-D warnings" $(CARGO) doc --no-deps

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

# The compose tool: the Docker CLI's plugin where it is installed, else the
# standalone docker-compose.
COMPOSE ?= $(shell docker compose version >/dev/null 2>&1 && echo "docker compose" || echo docker-compose)

# lottery:latest from the Dockerfile. With an image registry, from the official
# bases; without one (nothing can be pulled), on a Debian base made locally with
# debootstrap and the release binary built here (docker/images; needs root the
# first time, for debootstrap).
image:
	@if docker pull -q debian:bookworm-slim >/dev/null 2>&1; then \
	  docker build -t lottery:latest . ; \
	else \
	  echo "make image: no image registry answers; building on a local Debian base (docker/images)"; \
	  docker/images lottery; \
	fi

# lottery-postgres:15, PostgreSQL from Debian's packages with the official image's
# settings, for the PostgreSQL layout where postgres:15 cannot be pulled:
#   LOTTERY_POSTGRES_IMAGE=lottery-postgres:15 docker compose -f compose-pg.yaml up -d
postgres-image:
	@if docker pull -q debian:bookworm-slim >/dev/null 2>&1; then \
	  docker build -t lottery-postgres:15 docker/postgres ; \
	else \
	  docker/images postgres; \
	fi

up: data secrets
	$(COMPOSE) up -d

down:
	$(COMPOSE) down --timeout 10

logs:
	$(COMPOSE) logs -f
