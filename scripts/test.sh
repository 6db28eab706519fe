#!/usr/bin/env bash
# Runs every test of the workspace: unit, storage suite (SQLite and PostgreSQL), end-to-end (real binaries on
# loopback), the Python compatibility tests and the OpenAPI document's validation. Installs what the tests need
# that a fresh machine lacks (cargo-nextest if missing, PyGithub, grpcio, grpcio-tools and openapi-spec-validator
# from PyPI in a virtualenv under target/).
set -euo pipefail
cd "$(dirname "$0")/.."

venv="$PWD/target/test-venv"
if ! "$venv/bin/python" -c 'import github, grpc, grpc_tools.protoc, openapi_spec_validator' 2>/dev/null; then
    echo "== installing PyGithub, grpcio, grpcio-tools and openapi-spec-validator into $venv (for the compatibility and OpenAPI tests)"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check 'PyGithub==2.10.0' 'grpcio==1.85.1' \
        'grpcio-tools==1.85.1' 'openapi-spec-validator==0.9.0'
fi
export LICENSE_SYNC_TEST_PYTHON="$venv/bin/python"

# The PostgreSQL cases use a local server when one answers and no URL was given.
if [ -z "${LICENSE_SYNC_TEST_POSTGRES_URL:-}" ] && command -v pg_isready >/dev/null 2>&1 \
    && pg_isready -q -h 127.0.0.1 -p 5432; then
    export LICENSE_SYNC_TEST_POSTGRES_URL="postgres://postgres@127.0.0.1:5432/test"
fi

if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --workspace --no-fail-fast "$@"
else
    echo "== cargo-nextest not found, using cargo test"
    cargo test --workspace --no-fail-fast "$@"
fi
