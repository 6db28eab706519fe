# syntax=docker/dockerfile:1.7
#
# GHES simulator image, for demos and tests only (deploy/compose, and the example workload in deploy/k8s). It serves
# the site-admin all_users.csv report (with GHES's 202-then-200 behaviour), /api/v3/meta and the license endpoint over
# plain HTTP. Build from the REPOSITORY ROOT:
#
#   docker build -f deploy/docker/ghes-sim.Dockerfile -t license-sync-ghes-sim:dev .
#
# Run: mount an all_users.csv at /data/all_users.csv and set GHES_SIM_TOKEN (the site admin's token). Extra flags
# (`--seats N`, `--pending-polls N`, `--version X`) replace the default command, so repeat --listen and --csv.

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm

FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS builder
WORKDIR /src
COPY . .
RUN --mount=type=cache,id=license-sync-cargo-registry,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,id=license-sync-cargo-git,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,id=license-sync-target,target=/src/target,sharing=locked \
    cargo build --release --locked -p license-sync-ghes-sim --bin ghes-sim \
    && install -D -m 0755 target/release/ghes-sim /out/ghes-sim

FROM debian:${DEBIAN_RELEASE}-slim AS runtime
RUN groupadd --system --gid 10001 license-sync \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin license-sync
COPY --from=builder /out/ghes-sim /usr/local/bin/ghes-sim

LABEL org.opencontainers.image.title="license-sync-ghes-sim" \
      org.opencontainers.image.description="GitHub Enterprise Server simulator for license-sync demos and tests" \
      org.opencontainers.image.licenses="Apache-2.0"

USER 10001:10001
EXPOSE 8000

HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/8000 && printf 'GET /_sim/stats HTTP/1.1\\r\\nHost: localhost\\r\\nConnection: close\\r\\n\\r\\n' >&3 && read -r _ code _ <&3 && [ \"$code\" = 200 ]"]

ENTRYPOINT ["/usr/local/bin/ghes-sim"]
CMD ["--listen", "0.0.0.0:8000", "--csv", "/data/all_users.csv"]
