# syntax=docker/dockerfile:1.7
#
# license-sync-agent image (the sidecar next to a GHES instance). Build from the REPOSITORY ROOT:
#
#   docker build -f deploy/docker/agent.Dockerfile -t license-sync-agent:dev .
#
# Needs BuildKit (cache mounts; deploy/docker/agent.Dockerfile.dockerignore trims the context).
#
# Runtime: non-root (uid/gid 10001), only the binary and CA certificates on debian:bookworm-slim. The default command
# is `run` with the configuration at /etc/license-sync-agent/agent.toml (LICENSE_SYNC_AGENT_CONFIG; mount it, see
# services/agent/config/agent.example.toml). Its [agent] section should say
#   state_dir = "/var/lib/license-sync-agent"   (the volume below: enrolled credential, settings, pending snapshots)
#   listen    = "0.0.0.0:8091"                  (only if Prometheus or another container must reach the local API;
#                                                the default 127.0.0.1:8091 is enough for the health check)
# One-shot commands use the same image: `docker run … license-sync-agent:dev enroll --token-file FILE`.

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm

FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS builder
WORKDIR /src
COPY . .
RUN --mount=type=cache,id=license-sync-cargo-registry,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,id=license-sync-cargo-git,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,id=license-sync-target,target=/src/target,sharing=locked \
    cargo build --release --locked -p license-sync-agent --bin license-sync-agent \
    && install -D -m 0755 target/release/license-sync-agent /out/license-sync-agent

FROM debian:${DEBIAN_RELEASE}-slim AS runtime
# ca-certificates is not version-pinned on purpose: the point of the package is to stay current.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 license-sync \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /var/lib/license-sync-agent \
        --shell /usr/sbin/nologin license-sync \
    && install -d -o 10001 -g 10001 -m 0700 /var/lib/license-sync-agent \
    && install -d -o root -g root -m 0755 /etc/license-sync-agent
COPY --from=builder /out/license-sync-agent /usr/local/bin/license-sync-agent

LABEL org.opencontainers.image.title="license-sync-agent" \
      org.opencontainers.image.description="Per-instance license-sync agent: reads a GHES instance's users and streams usage snapshots to the aggregator" \
      org.opencontainers.image.licenses="Apache-2.0"

ENV LICENSE_SYNC_AGENT_CONFIG=/etc/license-sync-agent/agent.toml \
    LICENSE_SYNC_LOG_FORMAT=json
USER 10001:10001
WORKDIR /var/lib/license-sync-agent
VOLUME ["/var/lib/license-sync-agent"]
EXPOSE 8091

# The local API answers (GET /api/v1/status through the agent's own CLI; LICENSE_SYNC_AGENT_API, default
# http://127.0.0.1:8091, tells it where). Exit 7 when the API is unreachable.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["license-sync-agent", "status"]

ENTRYPOINT ["/usr/local/bin/license-sync-agent"]
CMD ["run"]
