# syntax=docker/dockerfile:1.7
#
# license-sync-aggregator image. Build from the REPOSITORY ROOT (the build context must hold the whole workspace):
#
#   docker build -f deploy/docker/aggregator.Dockerfile -t license-sync-aggregator:dev .
#
# Needs BuildKit (default since Docker 23) for the cache mounts and for the Dockerfile-specific ignore file
# deploy/docker/aggregator.Dockerfile.dockerignore, which keeps target/, .git/ and deploy/ out of the context.
#
# Runtime: non-root (uid/gid 10001), only the binary and CA certificates on debian:bookworm-slim. Listens on
# 0.0.0.0:8080 (REST, /healthz, /readyz, /metrics) and 0.0.0.0:50051 (gRPC) through the two
# LICENSE_SYNC_AGGREGATOR_*_LISTEN variables set below; environment variables win over a --config file, so
# change the listen addresses with those variables, not in the file. Without LICENSE_SYNC_AGGREGATOR_DATABASE_URL
# it uses the embedded default `sqlite://license-sync.db`, i.e. /var/lib/license-sync/license-sync.db (the working
# directory, a volume). For several replicas set a postgres:// URL instead.

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm

FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS builder
WORKDIR /src
COPY . .
# The target directory is a cache mount (shared with the other images' builds, hence `locked`), so the binary is
# copied out of it in the same step.
RUN --mount=type=cache,id=license-sync-cargo-registry,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,id=license-sync-cargo-git,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,id=license-sync-target,target=/src/target,sharing=locked \
    cargo build --release --locked -p license-sync-aggregator --bin license-sync-aggregator \
    && install -D -m 0755 target/release/license-sync-aggregator /out/license-sync-aggregator

FROM debian:${DEBIAN_RELEASE}-slim AS runtime
# ca-certificates is not version-pinned on purpose: the point of the package is to stay current.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 license-sync \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /var/lib/license-sync \
        --shell /usr/sbin/nologin license-sync \
    && install -d -o 10001 -g 10001 -m 0750 /var/lib/license-sync
COPY --from=builder /out/license-sync-aggregator /usr/local/bin/license-sync-aggregator

LABEL org.opencontainers.image.title="license-sync-aggregator" \
      org.opencontainers.image.description="Stores GHES usage snapshots, merges accounts into people, serves GitHub-compatible licensing endpoints" \
      org.opencontainers.image.licenses="Apache-2.0"

ENV LICENSE_SYNC_AGGREGATOR_HTTP_LISTEN=0.0.0.0:8080 \
    LICENSE_SYNC_AGGREGATOR_GRPC_LISTEN=0.0.0.0:50051 \
    LICENSE_SYNC_AGGREGATOR_LOG_FORMAT=json
USER 10001:10001
WORKDIR /var/lib/license-sync
VOLUME ["/var/lib/license-sync"]
EXPOSE 8080 50051

# Ready = the database answers (GET /readyz). No curl in the image: bash's /dev/tcp speaks the one request.
HEALTHCHECK --interval=15s --timeout=3s --start-period=20s --retries=3 \
    CMD ["bash", "-c", "exec 3<>\"/dev/tcp/127.0.0.1/${LICENSE_SYNC_AGGREGATOR_HTTP_LISTEN##*:}\" && printf 'GET /readyz HTTP/1.1\\r\\nHost: localhost\\r\\nConnection: close\\r\\n\\r\\n' >&3 && read -r _ code _ <&3 && [ \"$code\" = 200 ]"]

ENTRYPOINT ["/usr/local/bin/license-sync-aggregator"]
CMD ["serve"]
