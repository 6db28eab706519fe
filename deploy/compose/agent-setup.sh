#!/bin/sh
# Per-agent one-shots of the compose demo (agent image, uid 10001):
#   agent-setup.sh enroll   before the sidecar starts: exchange the one-time enrollment token written by bootstrap.sh
#                           for the instance credential, unless the state volume already holds one (re-enrolling
#                           would rotate the credential for nothing)
#   agent-setup.sh enable   once the sidecar is healthy: turn license sync on through its local API (owner token);
#                           the first sync starts at once. Retried while the control stream is still connecting
#                           (the agent answers 409 until its connection check succeeds).
# Environment: DEMO_GHES_HOST (which enrollment token), DEMO_AGENT_API (the sidecar's local API).
set -eu
bootstrap=/run/license-sync-bootstrap
state=/var/lib/license-sync-agent

case "${1:-}" in
    enroll)
        if [ -s "$state/credential.json" ]; then
            echo "agent-setup: $DEMO_GHES_HOST is already enrolled (credential.json present), nothing to do"
            exit 0
        fi
        exec license-sync-agent enroll --token-file "$bootstrap/enroll-$DEMO_GHES_HOST.token"
        ;;
    enable)
        attempt=1
        while :; do
            if license-sync-agent enable --api "$DEMO_AGENT_API" --owner-token-file "$bootstrap/agent-owner-token"; then
                exit 0
            fi
            if [ "$attempt" -ge 30 ]; then
                echo "agent-setup: could not enable license sync on $DEMO_AGENT_API after $attempt attempts" >&2
                exit 1
            fi
            attempt=$((attempt + 1))
            sleep 2
        done
        ;;
    *)
        echo "usage: agent-setup.sh enroll|enable" >&2
        exit 2
        ;;
esac
