#!/usr/bin/env bash
# Brings license-sync up on its embedded default (SQLite, no other service) with sample data:
# an aggregator, a GHES simulator for instance 1, and three agents (one reading the simulator's live report,
# two reading sample all_users.csv files). Prints where to look, then keeps the aggregator running until Ctrl-C.
#
# Ports: HTTP 8080 and gRPC 50051 on 127.0.0.1 (override with LICENSE_SYNC_DEMO_HTTP / LICENSE_SYNC_DEMO_GRPC).
set -euo pipefail
cd "$(dirname "$0")/.."
root="$PWD"

http_addr="${LICENSE_SYNC_DEMO_HTTP:-127.0.0.1:8080}"
grpc_addr="${LICENSE_SYNC_DEMO_GRPC:-127.0.0.1:50051}"
work="$root/target/quickstart"

echo "== building (first run takes a few minutes)"
cargo build --quiet --bins
bin="$root/target/debug"

rm -rf "$work" && mkdir -p "$work"
export LICENSE_SYNC_AGGREGATOR_DATABASE_URL="sqlite://$work/license-sync.db"
export LICENSE_SYNC_AGGREGATOR_HTTP_LISTEN="$http_addr"
export LICENSE_SYNC_AGGREGATOR_GRPC_LISTEN="$grpc_addr"
aggregator="$bin/license-sync-aggregator"

pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; }
trap cleanup EXIT INT TERM

echo "== creating enterprise 'acme' (20 purchased seats), an owner token and the cloud members"
"$aggregator" enterprise create --slug acme --name "Acme Corp" --seats 20 >/dev/null
token="$("$aggregator" token create --enterprise acme --name quickstart 2>/dev/null)"
"$aggregator" members import --enterprise acme --file examples/cloud-members.json

echo "== starting the aggregator on http://$http_addr (gRPC $grpc_addr)"
"$aggregator" serve >"$work/aggregator.ready" 2>"$work/aggregator.log" &
pids+=($!)
for _ in $(seq 1 100); do [ -s "$work/aggregator.ready" ] && break; sleep 0.1; done
[ -s "$work/aggregator.ready" ] || { echo "the aggregator did not start:"; cat "$work/aggregator.log"; exit 1; }

echo "== starting a GHES simulator serving examples/ghes-1.all_users.csv (answers 202 once, like GHES)"
sim_token="demo-site-admin-token"
"$bin/ghes-sim" --listen 127.0.0.1:0 --csv examples/ghes-1.all_users.csv --token "$sim_token" \
    --pending-polls 1 --seats 50 >"$work/ghes-sim.ready" 2>"$work/ghes-sim.log" &
pids+=($!)
for _ in $(seq 1 100); do [ -s "$work/ghes-sim.ready" ] && break; sleep 0.1; done
sim_url="http://$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["listening"])' "$work/ghes-sim.ready")"

server_ids=(6f1c8a38-5b2e-4a4f-9d44-8d4a4f1b6c01 0d6a1e43-2c55-4f2a-b7a9-3e9c1f0b2d02 9b3f7c21-8e4d-4b6a-a1c5-7d2e6f4a8c03)
for n in 1 2 3; do
    host="ghes-$n.example.com"
    credential="$("$aggregator" instance add --enterprise acme --server-id "${server_ids[$((n-1))]}" --hostname "$host" 2>/dev/null)"
    printf '%s' "$credential" >"$work/agent-$n.credential"
    chmod 600 "$work/agent-$n.credential"
    if [ "$n" = 1 ]; then
        source_section="kind = \"ghes\"
url = \"$sim_url\"
username = \"site-admin\"
token = \"$sim_token\"
poll_initial_ms = 200"
    else
        source_section="kind = \"file\"
path = \"$root/examples/ghes-$n.all_users.csv\""
    fi
    cat >"$work/agent-$n.toml" <<TOML
[instance]
server_id = "${server_ids[$((n-1))]}"
hostname = "$host"
ghes_version = "3.14.2"

[source]
$source_section

[aggregator]
endpoint = "http://$grpc_addr"
credential_file = "$work/agent-$n.credential"
TOML
    echo "== agent $n: sync $host"
    "$bin/license-sync-agent" sync --config "$work/agent-$n.toml" 2>>"$work/agent-$n.log" \
        | python3 examples/show.py receipt
done

api="http://$http_addr"
sleep 0.5
echo
echo "== consumed licenses"
curl -fsS -H "Authorization: Bearer $token" "$api/enterprises/acme/consumed-licenses?per_page=100" | python3 examples/show.py consumed
echo
echo "== license sync status"
curl -fsS -H "Authorization: Bearer $token" "$api/enterprises/acme/license-sync-status" | python3 examples/show.py status
cat <<TXT

The aggregator keeps running. Try, in another terminal:

  export TOKEN=$token
  curl -H "Authorization: Bearer \$TOKEN" "$api/enterprises/acme/consumed-licenses?per_page=5" -i
  curl -H "Authorization: Bearer \$TOKEN" "$api/enterprises/acme/license-sync-status"
  curl -H "Authorization: Bearer \$TOKEN" "$api/enterprises/acme/license-explanations?account=ghes-1.example.com:5"
  curl -H "Authorization: Bearer \$TOKEN" "$api/enterprises/acme/likely-duplicates"
  $bin/license-sync-agent sync --config $work/agent-2.toml      # Sync now

Logs and configs: $work   (Ctrl-C stops everything)
TXT
wait "${pids[0]}"
