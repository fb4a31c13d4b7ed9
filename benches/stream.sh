#!/usr/bin/env bash
# pitr stream: how far behind the repository is (the recovery point at risk) under pgbench
# at several rates, and what --sync costs a commit, in one run on the test bed's S3 server
# behind one stunnel TLS front:
#
#   benches/stream.sh              # rates 100 500 2000 tps, 20 s each
#   RATES="200 1000" SECONDS_EACH=30 benches/stream.sh
#   KEEP=1 ...                     # leave the work dir and servers up for a look
#
# For each rate, pgbench -R runs against a cluster that `pitr stream` (1 s flush interval)
# follows, while `pitr status --json` is sampled every 100 ms: the lag in bytes (WAL the
# server has that the repository does not) and in seconds (since all received WAL was last
# durable) are reported as p50 / p99 / max. Then the commit latency of pgbench (4 clients,
# unthrottled) without a synchronous standby, and with the stream in --sync mode named in
# synchronous_standby_names.
set -euo pipefail
cd "$(dirname "$0")/.."
RATES="${RATES:-100 500 2000}"
SECONDS_EACH="${SECONDS_EACH:-20}"
# shellcheck source=benches/lib.sh
. benches/lib.sh

dir="$work/db"
cp "$PITR" "$work/pitr"
new_cluster "$dir"
echo "max_wal_size = 4GB" >>"$dir/data/postgresql.conf"
start_cluster "$dir"
psql() { as_pg "$PGBIN/psql" -X -q -t -A -v ON_ERROR_STOP=1 -h "$dir" -p "$port" -U postgres -c "$1" postgres; }
as_pg "$PGBIN/pgbench" -q -i -s 10 -h "$dir" -p "$port" -U postgres postgres >/dev/null 2>&1
conn="host=$dir port=$port user=postgres"
export PITR_CACHE_DIR="$work/pitr-cache"
maddr="127.0.0.1:$(free_port)"
"$PITR" init --repo "s3://pitr-test/stream" --pg "$conn" >/dev/null

start_stream() { # extra args...
  "$PITR" stream --repo "s3://pitr-test/stream" --pg "$conn" --create-slot --metrics-addr "$maddr" "$@" \
    2>>"$work/stream.log" &
  stream_pid=$!
  pids+=("$stream_pid")
  for _ in $(seq 100); do "$PITR" status --metrics-addr "$maddr" >/dev/null 2>&1 && break; sleep 0.1; done
}
stop_stream() { kill -TERM "$stream_pid"; wait "$stream_pid" || true; }

# percentiles FILE COLUMN: p50 p99 max of a column of numbers
percentiles() {
  sort -n "$1" | awk '{ v[NR] = $1 } END {
    if (NR == 0) { print "- - -"; exit }
    i50 = int(NR * 0.50); if (i50 < 1) i50 = 1; i99 = int(NR * 0.99); if (i99 < 1) i99 = 1
    printf "%s %s %s\n", v[i50], v[i99], v[NR] }'
}

start_stream
printf '%-10s %8s %30s %30s\n' rate "tps" "lag bytes p50/p99/max" "lag seconds p50/p99/max"
for rate in $RATES; do
  : >"$work/lag-bytes"; : >"$work/lag-seconds"
  as_pg "$PGBIN/pgbench" -n -R "$rate" -T "$SECONDS_EACH" -c 4 -j 2 -h "$dir" -p "$port" -U postgres postgres \
    >"$work/pgbench.out" 2>&1 &
  bench=$!
  while kill -0 "$bench" 2>/dev/null; do
    "$PITR" status --json --metrics-addr "$maddr" 2>/dev/null \
      | python3 -c 'import json,sys; v=json.load(sys.stdin); print(v["lag_bytes"], v["lag_seconds"])' \
      >>"$work/lag" || true
    sleep 0.1
  done
  wait "$bench" || true
  awk '{print $1}' "$work/lag" >"$work/lag-bytes"; awk '{print $2}' "$work/lag" >"$work/lag-seconds"; : >"$work/lag"
  tps=$(grep -oP 'tps = \K[0-9.]+' "$work/pgbench.out" | head -1)
  read -r b50 b99 bmax < <(percentiles "$work/lag-bytes")
  read -r s50 s99 smax < <(percentiles "$work/lag-seconds")
  printf '%-10s %8.0f %30s %30s\n' "$rate" "$tps" "$b50 / $b99 / $bmax" "$s50 / $s99 / $smax"
done
latency() { as_pg "$PGBIN/pgbench" -n -T "$SECONDS_EACH" -c 4 -j 2 -h "$dir" -p "$port" -U postgres postgres 2>&1 \
  | awk '/latency average/ {l=$4} /^tps/ {t=$3} END {printf "%s ms, %.0f tps", l, t}'; }
echo
echo "commit latency, 4 clients: asynchronous stream: $(latency)"
stop_stream
start_stream --sync
psql "ALTER SYSTEM SET synchronous_standby_names = 'pitr'" >/dev/null
psql "SELECT pg_reload_conf()" >/dev/null
for _ in $(seq 100); do [ "$(psql "SELECT count(*) FROM pg_stat_replication WHERE sync_state = 'sync'")" = 1 ] && break; sleep 0.1; done
echo "commit latency, 4 clients: --sync (commits wait for the repository): $(latency)"
psql "ALTER SYSTEM RESET synchronous_standby_names" >/dev/null
psql "SELECT pg_reload_conf()" >/dev/null
stop_stream
