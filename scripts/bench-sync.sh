#!/usr/bin/env bash
# Measures one full sync of a synthetic GHES instance with release binaries, and prints the figures:
#   - parse only: `license-sync-agent check` (read + parse the CSV; the floor of the agent's own work),
#   - sync: `license-sync-agent sync` wall time (read, parse, stream over gRPC, validate, commit; ack after commit),
#   - merge: the first `consumed-licenses` read after the sync (waits for the merged view),
#   - peak RSS of the agent during the sync and of the aggregator at the end.
# Usage: scripts/bench-sync.sh [USERS] (default 100000). Runs on 127.0.0.1 only.
set -euo pipefail
cd "$(dirname "$0")/.."
users="${1:-100000}"

cargo build --release --quiet --bins
bin="$PWD/target/release"
work="$(mktemp -d)"
show_log() { grep -h "merged view rebuilt\|snapshot committed" "$work/aggregator.log" 2>/dev/null | sed 's/^/  aggregator log: /' >&2 || true; }
trap 'kill $(jobs -p) 2>/dev/null || true; show_log; rm -rf "$work"' EXIT

python3 - "$users" "$work/all_users.csv" <<'PY'
import random, sys
count, path = int(sys.argv[1]), sys.argv[2]
rng = random.Random(42)
with open(path, "w") as f:
    f.write("created_at,id,login,email,role,suspended?,last_logged_ip,repos,ssh_keys,org_memberships,dormant?,last_active,raw_login,2fa_enabled?\n")
    for i in range(1, count + 1):
        suspended = "true" if rng.random() < 0.03 else "false"
        dormant = "true" if rng.random() < 0.1 else "false"
        f.write(f"2021-03-04 10:22:33 UTC,{i},user{i},User{i}@Example.com,User,{suspended},10.0.0.1,3,1,2,{dormant},2024-05-06 07:08:09 UTC,user{i},true\n")
PY

export LICENSE_SYNC_AGGREGATOR_DATABASE_URL="sqlite://$work/bench.db"
export LICENSE_SYNC_AGGREGATOR_GRPC_LISTEN=127.0.0.1:0
export LICENSE_SYNC_AGGREGATOR_HTTP_LISTEN=127.0.0.1:0
export RUST_LOG=info
"$bin/license-sync-aggregator" enterprise create --slug bench --seats "$users" >/dev/null
token="$("$bin/license-sync-aggregator" token create --enterprise bench --name bench 2>/dev/null)"
server_id=4a0c2f8e-0d7b-4f52-9a61-2b1e5c3d7f90
credential="$("$bin/license-sync-aggregator" instance add --enterprise bench --server-id $server_id --hostname bench.example.com 2>/dev/null)"
"$bin/license-sync-aggregator" serve >"$work/ready" 2>"$work/aggregator.log" &
aggregator_pid=$!
for _ in $(seq 1 100); do [ -s "$work/ready" ] && break; sleep 0.1; done
grpc="$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["grpc"])' "$work/ready")"
http="$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["http"])' "$work/ready")"

cat >"$work/agent.toml" <<TOML
[instance]
server_id = "$server_id"
hostname = "bench.example.com"
ghes_version = "3.14.2"
[source]
kind = "file"
path = "$work/all_users.csv"
[aggregator]
endpoint = "http://$grpc"
credential = "$credential"
TOML

now() { date +%s.%N; }
elapsed() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.3f}')" "$1" "$2"; }

start=$(now); "$bin/license-sync-agent" check --config "$work/agent.toml" >/dev/null 2>&1; end=$(now)
parse=$(elapsed "$start" "$end")

start=$(now)
/usr/bin/env time -f "%M" -o "$work/agent.rss" "$bin/license-sync-agent" sync --config "$work/agent.toml" >"$work/receipt" 2>"$work/agent.log" \
    || { cat "$work/agent.log"; exit 1; }
end=$(now)
sync=$(elapsed "$start" "$end")

start=$(now)
consumed="$(curl -fsS -H "Authorization: Bearer $token" "http://$http/enterprises/bench/consumed-licenses?per_page=1" \
    | python3 -c 'import json,sys; print(json.load(sys.stdin)["total_seats_consumed"])')"
end=$(now)
merge=$(elapsed "$start" "$end")

# A second sync of the same data replaces the snapshot (delete + insert) — the steady-state weekly case.
start=$(now); "$bin/license-sync-agent" sync --config "$work/agent.toml" >/dev/null 2>&1; end=$(now)
resync=$(elapsed "$start" "$end")

aggregator_rss_kb=$(awk '/VmHWM/ {print $2}' "/proc/$aggregator_pid/status")
agent_rss_kb=$(cat "$work/agent.rss")
accepted=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["users_accepted"])' "$work/receipt")

python3 - "$users" "$accepted" "$consumed" "$parse" "$sync" "$resync" "$merge" "$agent_rss_kb" "$aggregator_rss_kb" <<'PY'
import sys
users, accepted, consumed = (int(v) for v in sys.argv[1:4])
parse, sync, resync, merge = (float(v) for v in sys.argv[4:8])
agent_kb, aggregator_kb = (int(v) for v in sys.argv[8:10])
print(f"users in CSV                 {users}")
print(f"users committed              {accepted}  (consumed seats after merge: {consumed})")
print(f"parse only (agent check)     {parse:.3f} s")
print(f"sync, first (CSV -> commit)  {sync:.3f} s   = {sync / parse:.1f}x parse-only")
print(f"sync, replace same instance  {resync:.3f} s   = {resync / parse:.1f}x parse-only")
print(f"merge + first REST page      {merge:.3f} s")
print(f"users/s (first sync)         {accepted / sync:,.0f}")
print(f"agent peak RSS               {agent_kb / 1024:.1f} MiB")
print(f"aggregator peak RSS          {aggregator_kb / 1024:.1f} MiB")
PY
