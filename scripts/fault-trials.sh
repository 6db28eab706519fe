#!/usr/bin/env bash
# Crash and storage-fault trials against the real binaries (debug build): kill -9 of the aggregator during 20
# concurrent syncs (SQLite and PostgreSQL), kill -9 of the agent during the spool write and the send,
# pg_terminate_backend mid-ingest, and SQLite's disk filled then freed. Prints per kind the trials, torn snapshots,
# acknowledged-but-lost syncs and recovery times, and fails if anything was torn, lost or otherwise broken.
#
#   ./scripts/fault-trials.sh                                # 3 trials of each kind (what CI runs)
#   nice -n 5 ./scripts/fault-trials.sh --trials 50          # a long run
#   ./scripts/fault-trials.sh --kinds agent-kill,disk-full --trials 10 --seed 42   # replay a seed
#   ./scripts/fault-trials.sh --postgres-url postgres://USER@HOST:5432/DB
#
# The PostgreSQL kinds need a server (LICENSE_SYNC_TEST_POSTGRES_URL or --postgres-url, default
# postgres://postgres@127.0.0.1:5432/test; each trial creates and drops a database of its own). `disk-full` mounts a
# 16 MiB tmpfs in a user and mount namespace of the aggregator's own (`unshare` from util-linux; no root needed where
# unprivileged user namespaces are allowed).
set -euo pipefail
cd "$(dirname "$0")/.."

# Tests and binaries together: the same feature set as `cargo nextest run --workspace`, so nothing is rebuilt after
# the tests ran.
cargo build --quiet --workspace --bins --tests
exec ./target/debug/license-sync-fault-trials "$@"
