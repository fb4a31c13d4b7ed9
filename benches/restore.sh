#!/usr/bin/env bash
# pitr restore against pgBackRest restore, in one run, over the same database and WAL: the
# recovery time (RTO) from "the host is gone" to a server accepting writes again.
#
#   benches/restore.sh             # pgbench -i -s 70 (about 1.1 GB), then about 1 GB of WAL
#   SCALE=20 WAL_MB=300 benches/restore.sh
#   KEEP=1 ...                     # leave the work dir and servers up for a look
#
# A cluster archives with both pitr wal-push and pgBackRest archive-push (asynchronous,
# process-max=2, zst level 1) into the test bed's S3 server behind one stunnel TLS front;
# both take a full backup; pgbench then writes WAL_MB of WAL; the time is noted and the
# cluster stopped. Each tool restores to that time into a new directory (pitr restore;
# pgbackrest restore --type=time with asynchronous archive-get), the server is started and
# timed until it has promoted and accepts a write; pitr once as is, once with
# --prefetch-wal, and once with --start (pitr starts the server and promotes it at the
# target without the waited end-of-recovery checkpoint). Prints restore, recovery and total seconds for each, and the ratios.
set -euo pipefail
cd "$(dirname "$0")/.."
SCALE="${SCALE:-70}"
WAL_MB="${WAL_MB:-1000}"
# shellcheck source=benches/lib.sh
. benches/lib.sh

dir="$work/db"
mkdir -p "$dir" "$work/pgbackrest-lock" "$work/pgbackrest-spool"
chmod 777 "$work/pgbackrest-lock" "$work/pgbackrest-spool"
cp "$PITR" "$work/pitr"
[ "$(id -u)" -eq 0 ] && chown -R postgres "$dir"
port="$(free_port)"
as_pg "$PGBIN/initdb" -D "$dir/data" -U postgres -A trust --no-sync >/dev/null
pgbackrest_conf "$work/pgbackrest.conf" "/pgr" "$dir/data" "$dir" "$port"
cat >>"$work/pgbackrest.conf" <<CONF
archive-async=y
archive-get-queue-max=1GiB
CONF
chmod 644 "$work/pgbackrest.conf"
cat >>"$dir/data/postgresql.conf" <<CONF
port = $port
listen_addresses = ''
unix_socket_directories = '$dir'
archive_mode = on
archive_command = '$work/pitr wal-push --repo s3://pitr-test/pitr-r %p && pgbackrest --config=$work/pgbackrest.conf --stanza=bench archive-push %p'
max_wal_size = 4GB
CONF
export PITR_CACHE_DIR="$work/pitr-cache"
as_pg "$PGBIN/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w start >/dev/null
clusters+=("$dir/data")
psql() { as_pg "$PGBIN/psql" -X -q -t -A -v ON_ERROR_STOP=1 -h "$1" -p "$2" -U postgres -c "$3" postgres; }
as_pg pgbackrest --config="$work/pgbackrest.conf" --stanza=bench stanza-create >/dev/null
echo "loading pgbench -i -s $SCALE ..." >&2
as_pg "$PGBIN/pgbench" -q -i -s "$SCALE" -h "$dir" -p "$port" -U postgres postgres >/dev/null 2>&1
conn="host=$dir port=$port user=postgres"
echo "backing up with both ..." >&2
"$PITR" backup --repo s3://pitr-test/pitr-r --pg "$conn" --fast >/dev/null
as_pg pgbackrest --config="$work/pgbackrest.conf" --stanza=bench --type=full --start-fast backup
start_lsn="$(psql "$dir" "$port" "SELECT pg_current_wal_lsn()")"
echo "writing $WAL_MB MB of WAL ..." >&2
while [ "$(psql "$dir" "$port" "SELECT ((pg_current_wal_lsn() - '$start_lsn') / 1000000)::bigint")" -lt "$WAL_MB" ]; do
  as_pg "$PGBIN/pgbench" -n -c 4 -j 2 -T 10 -h "$dir" -p "$port" -U postgres postgres >/dev/null 2>&1
done
target="$(psql "$dir" "$port" "SELECT to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US') || '+00'")"
sleep 1
psql "$dir" "$port" "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (1, 1, 1, 0, now())" # a commit after the target
seg="$(psql "$dir" "$port" "SELECT pg_walfile_name(pg_switch_wal())")"
for _ in $(seq 1200); do [ -f "$dir/data/pg_wal/archive_status/$seg.done" ] && break; sleep 0.25; done
size=$(psql "$dir" "$port" "SELECT sum(pg_database_size(oid)) FROM pg_database")
wal=$(psql "$dir" "$port" "SELECT (pg_current_wal_lsn() - '$start_lsn')::bigint")
as_pg "$PGBIN/pg_ctl" -D "$dir/data" -m immediate stop >/dev/null
echo "database $((size / 1000000)) MB, WAL to replay $((wal / 1000000)) MB, target $target" >&2

now() { date +%s.%N; }
# recover NAME DIR: starts the restored server, waits for a write to succeed; prints seconds.
recover() {
  local name="$1" d="$2" p t0
  p="$(free_port)"
  printf "port = %s\nunix_socket_directories = '%s'\narchive_mode = off\n" "$p" "$work/$name" >>"$d/postgresql.auto.conf"
  mkdir -p "$work/$name"; [ "$(id -u)" -eq 0 ] && chown postgres "$work/$name"
  t0=$(now)
  as_pg "$PGBIN/pg_ctl" -D "$d" -l "$work/$name/server.log" start >/dev/null
  clusters+=("$d")
  until psql "$work/$name" "$p" "CREATE TABLE IF NOT EXISTS rto_probe (x int); INSERT INTO rto_probe VALUES (1)" >/dev/null 2>&1; do sleep 0.05; done
  echo "$(now) - $t0" | bc
}
results=()
mkdir -p "$work/restores"; [ "$(id -u)" -eq 0 ] && chown postgres "$work/restores"

t0=$(now)
as_pg "$work/pitr" restore --repo s3://pitr-test/pitr-r --to "$work/restores/pitr" --target-time "$target" --target-action promote --json >"$work/pitr-restore.json"
t_pitr=$(echo "$(now) - $t0" | bc)
r_pitr=$(recover pitr-run "$work/restores/pitr")
as_pg "$PGBIN/pg_ctl" -D "$work/restores/pitr" -m immediate stop >/dev/null

t0=$(now)
as_pg "$work/pitr" restore --repo s3://pitr-test/pitr-r --to "$work/restores/pitr-staged" --target-time "$target" --target-action promote --prefetch-wal --json >"$work/pitr-staged-restore.json" 2>/dev/null
t_staged=$(echo "$(now) - $t0" | bc)
r_staged=$(recover pitr-staged-run "$work/restores/pitr-staged")
as_pg "$PGBIN/pg_ctl" -D "$work/restores/pitr-staged" -m immediate stop >/dev/null

# pitr restore --start: pitr starts the server and promotes it at the target (no waited
# end-of-recovery checkpoint); timed until the same probe write succeeds.
p="$(free_port)"
mkdir -p "$work/pitr-start-run"; [ "$(id -u)" -eq 0 ] && chown postgres "$work/pitr-start-run"
t0=$(now)
as_pg "$work/pitr" restore --repo s3://pitr-test/pitr-r --to "$work/restores/pitr-start" --target-time "$target" \
  --start --pg-bin "$PGBIN" --server-option "port=$p" --server-option "unix_socket_directories=$work/pitr-start-run" \
  --server-option archive_mode=off --json >"$work/pitr-start-restore.json"
clusters+=("$work/restores/pitr-start")
until psql "$work/pitr-start-run" "$p" "CREATE TABLE IF NOT EXISTS rto_probe (x int); INSERT INTO rto_probe VALUES (1)" >/dev/null 2>&1; do sleep 0.05; done
total_start=$(echo "$(now) - $t0" | bc)
t_start=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["seconds"])' "$work/pitr-start-restore.json")
r_start=$(echo "$total_start - $t_start" | bc)
cp "$work/restores/pitr-start/log/pitr-start.log" "$work/pitr-start-run/server.log"
as_pg "$PGBIN/pg_ctl" -D "$work/restores/pitr-start" -m immediate stop >/dev/null

t0=$(now)
as_pg pgbackrest --config="$work/pgbackrest.conf" --stanza=bench --pg1-path="$work/restores/pgbackrest" \
  --type=time --target="$target" --target-action=promote restore
t_pgb=$(echo "$(now) - $t0" | bc)
r_pgb=$(recover pgbackrest-run "$work/restores/pgbackrest")

echo
printf '%-12s %10s %10s %10s\n' tool restore recovery total
printf '%-12s %9.2fs %9.2fs %9.2fs\n' pitr "$t_pitr" "$r_pitr" "$(echo "$t_pitr + $r_pitr" | bc)"
printf '%-12s %9.2fs %9.2fs %9.2fs  (--prefetch-wal)\n' pitr "$t_staged" "$r_staged" "$(echo "$t_staged + $r_staged" | bc)"
printf '%-12s %9.2fs %9.2fs %9.2fs  (--start)\n' pitr "$t_start" "$r_start" "$total_start"
printf '%-12s %9.2fs %9.2fs %9.2fs\n' pgbackrest "$t_pgb" "$r_pgb" "$(echo "$t_pgb + $r_pgb" | bc)"
printf '\npgbackrest / pitr total: %.2fx, with --prefetch-wal %.2fx, with --start %.2fx\n' \
  "$(echo "($t_pgb + $r_pgb) / ($t_pitr + $r_pitr)" | bc -l)" "$(echo "($t_pgb + $r_pgb) / ($t_staged + $r_staged)" | bc -l)" \
  "$(echo "($t_pgb + $r_pgb) / $total_start" | bc -l)"
# Where the time went: pitr's phases, and each server's own account of its recovery (redo,
# then the end-of-recovery checkpoint PostgreSQL waits for before it accepts writes).
echo
for run in pitr pitr-staged pitr-start; do
  python3 -c 'import json,sys; j=json.load(open(sys.argv[1])); print("%-12s plan %.2fs, fetch+write %.2fs, flush %.2fs" % (sys.argv[2], j["plan_seconds"], j["write_seconds"], j["flush_seconds"]))' "$work/$run-restore.json" "$run"
done
for run in pitr-run pitr-staged-run pitr-start-run pgbackrest-run; do
  echo "$run: $(grep -o 'redo done at .*' "$work/$run/server.log" | grep -o 'elapsed: [0-9.]* s' | head -1 | sed 's/elapsed/redo/'); $(grep -o 'checkpoint complete: .*' "$work/$run/server.log" | head -1 | grep -o 'total=[0-9.]* s' | sed 's/total/first checkpoint/')"
done
