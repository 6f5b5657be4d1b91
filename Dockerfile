# The central and the agency, one image: `docker build -t lottery:latest .`
#
# Stages, in this order on purpose:
#   runtime-base  the runtime's base with the non-root user, its folders and the entrypoint
#   prebuilt      runtime-base plus a `lottery` binary built outside (the test path, below)
#   build         compiles the release binary (dependencies in their own cached layer)
#   runtime       runtime-base plus the binary from `build`: the default target
#
# The test path, for machines with no image registry (docker/images builds it this way):
#   docker build --build-arg RUNTIME_BASE=lottery-base:bookworm --target prebuilt \
#       -f Dockerfile -t lottery:latest DIR        # DIR holds only the release binary `lottery`
# where lottery-base:bookworm is a Debian bookworm root file system made with debootstrap and
# loaded with `docker import`. It is the same image as the default one but for the base's name
# and where the binary was compiled. `prebuilt` comes before `build` so that building it never
# needs the Rust image.

ARG RUNTIME_BASE=debian:bookworm-slim

FROM ${RUNTIME_BASE} AS runtime-base
# The named volumes are mounted at /var/lib/lottery/data (the central's bets
# file) and /var/lib/lottery/seals (the agencies' kept seals): a named volume
# mounted on a folder the image has takes that folder's owner, so the
# non-root programs can write there (a folder Docker made for the mount
# would belong to root).
RUN useradd --system --uid 10001 --home-dir /var/lib/lottery --create-home lottery \
 && install -d -o lottery -g lottery /var/lib/lottery/data /var/lib/lottery/seals
USER lottery
WORKDIR /var/lib/lottery
ENTRYPOINT ["/usr/local/bin/lottery"]
CMD ["server"]

FROM runtime-base AS prebuilt
COPY lottery /usr/local/bin/lottery

# Build stage: dependencies first, in their own cached layer.
FROM rust:1-slim-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src benches \
 && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
 && echo 'fn main() {}' > benches/codec.rs && echo 'fn main() {}' > benches/storage.rs \
 && cargo build --release --locked \
 && rm -rf src benches
COPY src src
COPY benches benches
# `--build-arg CONSOLE=1` builds the tokio-console build instead (the
# `console` feature with tokio's unstable flag; every crate is rebuilt).
ARG CONSOLE=
RUN touch src/main.rs src/lib.rs \
 && if [ -n "$CONSOLE" ]; then \
      RUSTFLAGS="--cfg tokio_unstable" cargo build --release --locked --features console; \
    else \
      cargo build --release --locked; \
    fi

FROM runtime-base AS runtime
COPY --from=build /src/target/release/lottery /usr/local/bin/lottery
