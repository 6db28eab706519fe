#!/bin/sh
# One-shot bootstrap of the compose demo, run by the `bootstrap` service (aggregator image, uid 10001) before the
# aggregators start. Administration commands work directly on the database, so no server has to run yet.
# Idempotent: run again at every `docker compose up`.
#
# Writes into the `bootstrap` volume (mounted here at /var/lib/license-sync, read-only in the agents at
# /run/license-sync-bootstrap), every file mode 0600:
#   owner-rest-token           the enterprise owner's REST token (created once)
#   agent-owner-token          the owner token of the agents' local API (created once, random)
#   enroll-<host>.token        a fresh one-time enrollment token per GHES host (1 h), used only by an agent that is
#                              not enrolled yet
set -eu
umask 077
out=/var/lib/license-sync
agg=/usr/local/bin/license-sync-aggregator
enterprise="${DEMO_ENTERPRISE:-acme}"
seats="${DEMO_SEATS:-20}"
hosts="${DEMO_GHES_HOSTS:-ghes-1.example.com ghes-2.example.com}"
export RUST_LOG="${RUST_LOG:-warn}"

# Writes stdin to $1 atomically (temporary file, then rename), so that a failed command leaves no empty token file.
write_file() {
    cat >"$1.tmp"
    [ -s "$1.tmp" ] || { echo "bootstrap: nothing to write into $1" >&2; rm -f "$1.tmp"; exit 1; }
    mv "$1.tmp" "$1"
}

if ! message="$("$agg" enterprise create --slug "$enterprise" --name "Acme Corp" --seats "$seats" 2>&1 >/dev/null)"; then
    case "$message" in
        *"already exists"*) echo "bootstrap: enterprise $enterprise exists" ;;
        *) echo "bootstrap: cannot create the enterprise: $message" >&2; exit 1 ;;
    esac
else
    echo "bootstrap: created enterprise $enterprise with $seats purchased seats"
fi

"$agg" members import --enterprise "$enterprise" --file /opt/license-sync-demo/cloud-members.json

if [ ! -s "$out/owner-rest-token" ]; then
    "$agg" token create --enterprise "$enterprise" --name "compose demo owner $(date -u +%Y%m%dT%H%M%SZ)" 2>/dev/null \
        | write_file "$out/owner-rest-token"
    echo "bootstrap: owner REST token written to the bootstrap volume (owner-rest-token)"
fi

if [ ! -s "$out/agent-owner-token" ]; then
    head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' | write_file "$out/agent-owner-token"
    echo "bootstrap: agents' local API owner token written (agent-owner-token)"
fi

for host in $hosts; do
    "$agg" enrollment-token create --enterprise "$enterprise" --expires-in-hours 1 2>/dev/null \
        | write_file "$out/enroll-$host.token"
    echo "bootstrap: one-time enrollment token for $host written (enroll-$host.token, valid 1 h)"
done
