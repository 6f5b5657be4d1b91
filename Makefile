# Shortcuts for the common jobs. Everything here runs with only the Rust toolchain,
# except the container targets, which need Docker.

AGENCIES ?= 5
CARGO ?= cargo

.PHONY: build test lint fmt bench demo demo-real data server image up down logs

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

image:
	docker build -t lottery:latest .

up: data
	docker compose up -d

down:
	docker compose down --timeout 10

logs:
	docker compose logs -f
