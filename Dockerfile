# Multi-stage build; needs no BuildKit feature (the tests use the classic builder).
#
#   docker build -t gemini-balancer .                        # the gateway
#   docker build --target fake -t gemini-balancer-fake .     # fake upstream + test proxy
#
# Base images are build arguments, so machines without a registry can pass
# local ones (see scripts/base-images):
#   --build-arg BUILDER_IMAGE=...  Debian bookworm with cargo on PATH and a C
#                                  compiler
#   --build-arg RUNTIME_IMAGE=...  Debian bookworm
ARG BUILDER_IMAGE=rust:1.89-slim-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim

# Recipe: the manifests plus an empty `fn main() {}` at every target path
# that `cargo metadata` reports. Generated from Cargo.toml on every build,
# so it cannot drift from it; its content changes only when the manifests or
# the list of targets do, and the dependency layer below is cached on it.
FROM ${BUILDER_IMAGE} AS recipe
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
RUN mkdir -p /recipe \
 && cp Cargo.toml Cargo.lock /recipe/ \
 && cargo metadata --offline --no-deps --format-version 1 >/tmp/metadata.json \
 && grep -o '"src_path":"[^"]*"' /tmp/metadata.json | cut -d'"' -f4 | sort -u >/tmp/targets \
 && test -s /tmp/targets \
 && while read -r path; do \
      rel="${path#/src/}"; \
      mkdir -p "/recipe/$(dirname "$rel")"; \
      echo 'fn main() {}' >"/recipe/$rel"; \
    done </tmp/targets

FROM ${BUILDER_IMAGE} AS build
WORKDIR /src
# Dependency layer: rebuilt only when the recipe changes.
COPY --from=recipe /recipe ./
RUN cargo build --release --locked --bins
COPY config ./config
COPY src ./src
# The sources may be older than the recipe's build: touch them so cargo
# rebuilds this crate rather than keeping the empty targets.
RUN find src -type f -exec touch {} + \
 && cargo build --release --locked --bins \
 && mkdir -p /out \
 && cp target/release/gemini-balancer target/release/fake-gemini target/release/test-proxy /out/

# The fake Gemini upstream and the test proxy, for the compose demo profile
# and the tests. Not part of the release image.
FROM ${RUNTIME_IMAGE} AS fake
COPY --from=build /out/fake-gemini /out/test-proxy /usr/local/bin/
USER 10001:10001
ENV FAKE_LISTEN=0.0.0.0:8000
EXPOSE 8000
ENTRYPOINT ["fake-gemini"]

# The release image (the default target): the gateway binary only, non-root,
# no secrets.
FROM ${RUNTIME_IMAGE} AS runtime
RUN groupadd --system --gid 10001 gateway \
 && useradd --system --uid 10001 --gid gateway --no-create-home --shell /usr/sbin/nologin gateway
COPY --from=build /out/gemini-balancer /usr/local/bin/gemini-balancer
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
