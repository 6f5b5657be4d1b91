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
RUN touch src/main.rs src/lib.rs && cargo build --release --locked

# Run stage: a slim base and a non-root user.
FROM debian:bookworm-slim
# The bets volume is mounted at /var/lib/lottery/data: a named volume
# mounted on a folder the image has takes that folder's owner, so the
# non-root central can write its bets file there (a folder Docker made
# for the mount would belong to root).
RUN useradd --system --uid 10001 --home-dir /var/lib/lottery --create-home lottery \
 && install -d -o lottery -g lottery /var/lib/lottery/data
COPY --from=build /src/target/release/lottery /usr/local/bin/lottery
USER lottery
WORKDIR /var/lib/lottery
ENTRYPOINT ["/usr/local/bin/lottery"]
CMD ["server"]
