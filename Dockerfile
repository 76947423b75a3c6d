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

# Recipe: every manifest of the workspace (the gateway at the root, the
# development tools under dev/) plus an empty `fn main() {}` at every target
# path, both as `cargo metadata` reports them. Generated on every build, so it
# cannot drift from the manifests; its content changes only when they or the
# list of targets do, and the dependency layers below are cached on it.
FROM ${BUILDER_IMAGE} AS recipe
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY dev ./dev
RUN mkdir -p /recipe \
 && cp Cargo.lock /recipe/ \
 && cargo metadata --offline --no-deps --format-version 1 >/tmp/metadata.json \
 && grep -o '"manifest_path":"[^"]*"' /tmp/metadata.json | cut -d'"' -f4 | sort -u >/tmp/manifests \
 && grep -o '"src_path":"[^"]*"' /tmp/metadata.json | cut -d'"' -f4 | sort -u >/tmp/targets \
 && test -s /tmp/manifests && test -s /tmp/targets \
 && while read -r path; do \
      rel="${path#/src/}"; \
      mkdir -p "/recipe/$(dirname "$rel")"; \
      cp "$path" "/recipe/$rel"; \
    done </tmp/manifests \
 && while read -r path; do \
      rel="${path#/src/}"; \
      mkdir -p "/recipe/$(dirname "$rel")"; \
      echo 'fn main() {}' >"/recipe/$rel"; \
    done </tmp/targets

# The gateway, alone (`-p gemini-balancer`).
FROM ${BUILDER_IMAGE} AS build
WORKDIR /src
# Dependency layer: rebuilt only when the recipe changes.
COPY --from=recipe /recipe ./
RUN cargo build --release --locked -p gemini-balancer --bins
COPY config ./config
COPY src ./src
# As above: touch the sources so cargo rebuilds the crate.
RUN find src -type f -exec touch {} + \
 && cargo build --release --locked -p gemini-balancer --bins \
 && mkdir -p /out \
 && cp target/release/gemini-balancer /out/

# The development tools (dev/): the fake Gemini upstream and the test proxy,
# built after the gateway, on its target directory (most of their
# dependencies are the gateway's, so few are compiled again), never into the
# gateway's image. BuildKit builds only the stages a target needs; the
# classic builder builds every stage before the target, so there the default
# target also compiles these, in a stage nothing copies into the release
# image.
FROM build AS build-dev
COPY dev ./dev
# The sources may be older than the build above: touch them so cargo
# rebuilds the crates rather than keeping the recipe's empty targets.
RUN find dev -type f -exec touch {} + \
 && cargo build --release --locked -p fake-gemini -p test-proxy --bins \
 && mkdir -p /out \
 && cp target/release/fake-gemini target/release/test-proxy /out/

# Their image, for the compose demo profile and the tests. Not part of the
# release image.
FROM ${RUNTIME_IMAGE} AS fake
COPY --from=build-dev /out/fake-gemini /out/test-proxy /usr/local/bin/
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
