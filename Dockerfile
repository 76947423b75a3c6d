# syntax=docker/dockerfile:1
# Multi-stage build: dependencies are compiled in their own layer (cached
# until Cargo.toml/Cargo.lock change), then the gateway; the runtime image
# holds only the binary, runs as a non-root user and carries no secrets.

FROM rust:1.89-slim-bookworm AS build
WORKDIR /src
# Dependency layer: build against stub sources so this layer only depends on
# the manifests.
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src/bin/fake-gemini \
 && echo 'fn main() {}' > src/main.rs \
 && echo '' > src/lib.rs \
 && echo 'fn main() {}' > src/bin/fake-gemini/main.rs \
 && cargo build --release --locked --bins \
 && rm -rf src target/release/deps/gemini_balancer* target/release/deps/libgemini_balancer* \
           target/release/deps/fake_gemini* target/release/.fingerprint/gemini-balancer-*
COPY config ./config
COPY src ./src
RUN cargo build --release --locked --bins

FROM debian:bookworm-slim AS runtime
RUN groupadd --system --gid 10001 gateway \
 && useradd --system --uid 10001 --gid gateway --no-create-home --shell /usr/sbin/nologin gateway
COPY --from=build /src/target/release/gemini-balancer /usr/local/bin/gemini-balancer
# The fake upstream, for the offline demo profile of docker-compose.yml.
COPY --from=build /src/target/release/fake-gemini /usr/local/bin/fake-gemini
USER 10001:10001
ENV GB_LISTEN=0.0.0.0:8000 \
    GB_LOG_FORMAT=json
EXPOSE 8000
# `healthcheck` reads the same configuration; give it a dummy key/token when
# the real ones come from files the check cannot see.
HEALTHCHECK --interval=10s --timeout=5s --start-period=5s --retries=3 \
  CMD ["gemini-balancer", "healthcheck"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["gemini-balancer"]
