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
# timed until it has promoted and accepts a write; pitr as is, with --prefetch-wal, and
# with --start (pitr starts the server and promotes it at the target without the waited
# end-of-recovery checkpoint), and pitr drill to the same target (its own reported RTO,
# against the aim: at most half of pgbackrest's restore + recovery). Two rounds, the second in reverse order; prints restore,
# recovery and total seconds of each variant's better run, both totals, and the ratios.
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
archive_command = '$work/pitr wal-push --repo s3://pitr-test/pitr-r %p && $work/pitr wal-push --repo s3://pitr-test/pitr-renc --key-file $work/key --state-dir pg_wal/.pitr/push-enc %p && pgbackrest --config=$work/pgbackrest.conf --stanza=bench archive-push %p'
max_wal_size = 4GB
CONF
export PITR_CACHE_DIR="$work/pitr-cache"
"$PITR" init --repo s3://pitr-test/pitr-r --data-dir "$dir/data" >/dev/null
# The same WAL and backup in an encrypted repository too (a key file), to time what
# encryption costs a restore.
head -c 32 /dev/urandom >"$work/key"
[ "$(id -u)" -eq 0 ] && chown postgres "$work/key"
"$PITR" init --encrypt --key-file "$work/key" --repo s3://pitr-test/pitr-renc --data-dir "$dir/data" >/dev/null
as_pg "$PGBIN/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w start >/dev/null
clusters+=("$dir/data")
psql() { as_pg "$PGBIN/psql" -X -q -t -A -v ON_ERROR_STOP=1 -h "$1" -p "$2" -U postgres -c "$3" postgres; }
as_pg pgbackrest --config="$work/pgbackrest.conf" --stanza=bench stanza-create >/dev/null
echo "loading pgbench -i -s $SCALE ..." >&2
as_pg "$PGBIN/pgbench" -q -i -s "$SCALE" -h "$dir" -p "$port" -U postgres postgres >/dev/null 2>&1
conn="host=$dir port=$port user=postgres"
echo "backing up with both ..." >&2
"$PITR" backup --repo s3://pitr-test/pitr-r --pg "$conn" --fast >/dev/null
"$PITR" backup --repo s3://pitr-test/pitr-renc --key-file "$work/key" --pg "$conn" --fast >/dev/null
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
# settle: before each timed restore, the previous run's leftovers must not weigh on it: its
# server is stopped and its directory removed, its prefetch worker (which lingers a few
# seconds) stopped, and the dirty pages it left (an immediate stop after replay leaves
# hundreds of MB) written out.
settle() {
  if [ -n "${1:-}" ]; then
    as_pg "$PGBIN/pg_ctl" -D "$1" -m immediate stop >/dev/null 2>&1 || true
    rm -rf "$1"
  fi
  pkill -f "pitr wal-prefetch" 2>/dev/null || true
  sync
  sleep 1
}
mkdir -p "$work/restores"; [ "$(id -u)" -eq 0 ] && chown postgres "$work/restores"
# Each timed run prints "restore recovery total" (seconds) and leaves its server log and
# restore report under $work/NAME-run and $work/NAME-restore.json.
timed_pitr() { # NAME [restore args]: pitr restore, then the server started by the bench
  local name="$1" t0 t r
  shift
  t0=$(now)
  as_pg "$work/pitr" restore --repo s3://pitr-test/pitr-r --to "$work/restores/$name" --target-time "$target" \
    --target-action promote --json "$@" >"$work/$name-restore.json" 2>/dev/null
  t=$(echo "$(now) - $t0" | bc)
  r=$(recover "$name-run" "$work/restores/$name")
  echo "$t $r $(echo "$t + $r" | bc)"
  settle "$work/restores/$name"
}
timed_start() { # NAME [REPO [restore args]]: pitr restore --start (pitr starts the server and
  # promotes it at the target, without the waited end-of-recovery checkpoint), until the
  # same probe write
  local name="$1" repo="${2:-s3://pitr-test/pitr-r}" t0 t total p
  shift; shift || true
  p="$(free_port)"
  mkdir -p "$work/$name-run"; [ "$(id -u)" -eq 0 ] && chown postgres "$work/$name-run"
  t0=$(now)
  as_pg "$work/pitr" restore --repo "$repo" --to "$work/restores/$name" --target-time "$target" "$@" \
    --start --pg-bin "$PGBIN" --server-option "port=$p" --server-option "unix_socket_directories=$work/$name-run" \
    --server-option archive_mode=off --json >"$work/$name-restore.json"
  clusters+=("$work/restores/$name")
  until psql "$work/$name-run" "$p" "CREATE TABLE IF NOT EXISTS rto_probe (x int); INSERT INTO rto_probe VALUES (1)" >/dev/null 2>&1; do sleep 0.05; done
  total=$(echo "$(now) - $t0" | bc)
  t=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["seconds"])' "$work/$name-restore.json")
  cp "$work/restores/$name/log/pitr-start.log" "$work/$name-run/server.log"
  echo "$t $(echo "$total - $t" | bc) $total"
  settle "$work/restores/$name"
}
timed_drill() { # NAME: pitr drill to the same target: its own reported RTO (start of the
  # command until the server accepted writes), restore = plan + files, recovery = the rest
  local name="$1"
  mkdir -p "$work/drills"; [ "$(id -u)" -eq 0 ] && chown postgres "$work/drills"
  as_pg "$work/pitr" drill --repo s3://pitr-test/pitr-r --target-time "$target" --pg-bin "$PGBIN" \
    --work-dir "$work/drills" --check "SELECT true" --json >"$work/$name-drill.json"
  python3 -c 'import json,sys; j=json.load(open(sys.argv[1])); p=j["phases"]; t=p["plan"]+p["files"]; print("%.3f %.3f %.3f" % (t, j["rto_seconds"]-t, j["rto_seconds"]))' "$work/$name-drill.json"
  settle
}
timed_pgbackrest() { # NAME
  local name="$1" t0 t r
  t0=$(now)
  as_pg pgbackrest --config="$work/pgbackrest.conf" --stanza=bench --pg1-path="$work/restores/$name" \
    --type=time --target="$target" --target-action=promote restore >&2
  t=$(echo "$(now) - $t0" | bc)
  r=$(recover "$name-run" "$work/restores/$name")
  echo "$t $r $(echo "$t + $r" | bc)"
  settle "$work/restores/$name"
}
# Two rounds, the second in reverse order, so that no tool always runs first (on the
# cleanest machine) or last; each tool's better run is reported, and both totals.
declare -A best runs best_round
run() { # VARIANT: one timed run of it
  local out
  case "$1" in
    pitr) out=$(timed_pitr "pitr-$round") ;;
    staged) out=$(timed_pitr "staged-$round" --prefetch-wal) ;;
    start) out=$(timed_start "start-$round") ;;
    encrypted) out=$(timed_start "encrypted-$round" s3://pitr-test/pitr-renc --key-file "$work/key") ;;
    pgbackrest) out=$(timed_pgbackrest "pgbackrest-$round") ;;
    drill) out=$(timed_drill "drill-$round") ;;
  esac
  runs[$1]="${runs[$1]:-}${runs[$1]:+, }$(echo "$out" | awk '{printf "%.2f", $3}')"
  if [ -z "${best[$1]:-}" ] || [ "$(echo "$(echo "$out" | awk '{print $3}') < $(echo "${best[$1]}" | awk '{print $3}')" | bc)" = 1 ]; then
    best[$1]="$out"
    best_round[$1]=$round
  fi
}
settle
for round in 1 2; do
  if [ "$round" = 1 ]; then order="pitr staged start encrypted drill pgbackrest"; else order="pgbackrest drill encrypted start staged pitr"; fi
  for v in $order; do run "$v"; done
done

echo
printf '%-28s %9s %9s %9s   %s\n' tool restore recovery total "(both runs' totals)"
for v in pitr staged start encrypted drill pgbackrest; do
  case "$v" in
    pitr) label="pitr" ;; staged) label="pitr --prefetch-wal" ;; start) label="pitr --start" ;; encrypted) label="pitr --start, encrypted" ;; drill) label="pitr drill (its RTO)" ;; pgbackrest) label="pgbackrest" ;;
  esac
  read -r t r tot <<<"${best[$v]}"
  printf '%-28s %8.2fs %8.2fs %8.2fs   (%s)\n' "$label" "$t" "$r" "$tot" "${runs[$v]}"
done
pgb=$(echo "${best[pgbackrest]}" | awk '{print $3}')
printf '\npgbackrest / pitr total: %.2fx, with --prefetch-wal %.2fx, with --start %.2fx\n' \
  "$(echo "$pgb / $(echo "${best[pitr]}" | awk '{print $3}')" | bc -l)" \
  "$(echo "$pgb / $(echo "${best[staged]}" | awk '{print $3}')" | bc -l)" \
  "$(echo "$pgb / $(echo "${best[start]}" | awk '{print $3}')" | bc -l)"
printf 'pitr drill RTO / pgbackrest total: %.2f (the aim: at most 0.5)\n' \
  "$(echo "$(echo "${best[drill]}" | awk '{print $3}') / $pgb" | bc -l)"
printf 'pitr --start encrypted / plain total: %.2fx\n' \
  "$(echo "$(echo "${best[encrypted]}" | awk '{print $3}') / $(echo "${best[start]}" | awk '{print $3}')" | bc -l)"
# Where the time went, in each variant's better run: pitr's phases, and each server's own
# account of its recovery (redo, then the first checkpoint: the end-of-recovery one that
# PostgreSQL waits for before it accepts writes, except after --start's promotion).
echo
for v in pitr staged start; do
  run="$v-${best_round[$v]}"
  python3 -c 'import json,sys; j=json.load(open(sys.argv[1])); print("%-16s plan %.2fs, fetch+write %.2fs, flush %.2fs" % (sys.argv[2], j["plan_seconds"], j["write_seconds"], j["flush_seconds"]))' "$work/$run-restore.json" "$run"
done
for v in pitr staged start pgbackrest; do
  run="$v-${best_round[$v]}-run"
  echo "$run: $(grep -o 'redo done at .*' "$work/$run/server.log" | grep -o 'elapsed: [0-9.]* s' | head -1 | sed 's/elapsed/redo/'); $(grep -o 'checkpoint complete: .*' "$work/$run/server.log" | head -1 | grep -o 'total=[0-9.]* s' | sed 's/total/first checkpoint/')"
done
# verify reads what a restore reads (the backup's files, the WAL to the end), minus the
# writes: its plaintext MB/s beside the restore's file phase, and pgBackRest's verify.
echo
t0=$(now)
as_pg "$work/pitr" verify --repo s3://pitr-test/pitr-r --json >"$work/verify.json" || true
tv=$(echo "$(now) - $t0" | bc)
t0=$(now)
as_pg pgbackrest --config="$work/pgbackrest.conf" --stanza=bench verify >"$work/pgbackrest-verify.log" 2>&1 || true
tp=$(echo "$(now) - $t0" | bc)
python3 - "$work/verify.json" "$work/start-${best_round[start]}-restore.json" "$tv" "$tp" <<'PY'
import json, sys
v = json.load(open(sys.argv[1])); r = json.load(open(sys.argv[2]))
tv, tp = float(sys.argv[3]), float(sys.argv[4])
mb = v["bytes"] / 1e6
restore_mb_s = r.get("bytes", 0) / 1e6 / max(r["write_seconds"], 1e-9)
print("pitr verify: %.0f MB of plaintext (backup files and WAL) in %.2f s: %.0f MB/s; %d problem(s)" % (mb, tv, mb / tv, len(v["problems"])))
print("pitr restore --start file phase: %.0f MB/s (fetch+write)" % restore_mb_s)
print("pgbackrest verify: %.2f s; pgbackrest / pitr verify time: %.2fx" % (tp, tp / tv))
PY
# expire beside pgBackRest's: the source comes back, both take a second full backup, and
# each removes the first one and the WAL before the second (pitr expire --keep-last 1,
# which also repacks; pgbackrest expire --repo1-retention-full=1).
echo
as_pg "$PGBIN/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w start >/dev/null
as_pg "$PGBIN/pgbench" -n -c 4 -j 2 -T 10 -h "$dir" -p "$port" -U postgres postgres >/dev/null 2>&1
"$PITR" backup --repo s3://pitr-test/pitr-r --pg "$conn" --fast >/dev/null
as_pg pgbackrest --config="$work/pgbackrest.conf" --stanza=bench --type=full --start-fast backup
t0=$(now)
"$PITR" expire --repo s3://pitr-test/pitr-r --keep-last 1 --grace 0s --json >"$work/expire.json"
te=$(echo "$(now) - $t0" | bc)
t0=$(now)
as_pg pgbackrest --config="$work/pgbackrest.conf" --stanza=bench --repo1-retention-full=1 expire >"$work/pgbackrest-expire.log" 2>&1
tpe=$(echo "$(now) - $t0" | bc)
python3 - "$work/expire.json" "$te" "$tpe" <<'PY'
import json, sys
v = json.load(open(sys.argv[1])); te, tp = float(sys.argv[2]), float(sys.argv[3])
r = v["removed"]
print("pitr expire --keep-last 1: %.2f s, removed %d backup(s), %d WAL file(s), %d pack(s), %.0f MB; repacked %d pack(s)" % (te, r["backups"], r["wal_files"], r["packs"], r["bytes"] / 1e6, v["repacked"]["packs"]))
print("pgbackrest expire --repo1-retention-full=1: %.2f s; pgbackrest / pitr expire time: %.2fx" % (tp, tp / te))
PY
