#!/usr/bin/env bash
# pitr backup against pg_basebackup and pgBackRest, in one run, over the same database:
#
#   benches/backup.sh              # pgbench -i -s 70 (about 1.1 GB)
#   SCALE=20 RUNS=3 benches/backup.sh
#   KEEP=1 ...                     # leave the work dir and servers up for a look
#
# It initdb's a cluster with the machine's PostgreSQL, archiving with both pitr wal-push
# and pgBackRest archive-push (each backup waits for its WAL in its own repository), loads
# pgbench -i -s SCALE, then times, RUNS times each: pg_basebackup -Ft to local disk (plain
# and with server-side zstd level 1), pgBackRest full backups (process-max=2, zst level 1)
# and pitr backups (each into an empty repository, then once more into the same one, which
# stores only what changed) on the test bed's S3 server behind one stunnel TLS front. It
# prints wall time, MB/s of the database size, CPU time and peak RSS of each, and the
# ratio of pgBackRest's time to pitr's.
set -euo pipefail
cd "$(dirname "$0")/.."
SCALE="${SCALE:-70}"
RUNS="${RUNS:-1}"
# shellcheck source=benches/lib.sh
. benches/lib.sh

dir="$work/db"
cp "$PITR" "$work/pitr" # where the server's user can run it
mkdir -p "$dir"
[ "$(id -u)" -eq 0 ] && chown -R postgres "$dir"
port="$(free_port)"
as_pg "$PGBIN/initdb" -D "$dir/data" -U postgres -A trust --no-sync >/dev/null
pgbackrest_conf "$work/pgbackrest.conf" "/pgb" "$dir/data" "$dir" "$port"
chmod 644 "$work/pgbackrest.conf"
cat >>"$dir/data/postgresql.conf" <<CONF
port = $port
listen_addresses = ''
unix_socket_directories = '$dir'
archive_mode = on
archive_command = '$work/pitr wal-push --repo s3://pitr-test/pitr-archive %p && pgbackrest --config=$work/pgbackrest.conf --stanza=bench archive-push %p'
max_wal_size = 4GB
max_wal_senders = 4
CONF
"$PITR" init --repo s3://pitr-test/pitr-archive --data-dir "$dir/data" >/dev/null
as_pg env PITR_CACHE_DIR="$work/pitr-cache" "$PGBIN/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w start >/dev/null
clusters+=("$dir/data")
mkdir -p "$work/pgbackrest-lock" "$work/pgbackrest-spool" && chmod 777 "$work/pgbackrest-lock" "$work/pgbackrest-spool"
as_pg pgbackrest --config="$work/pgbackrest.conf" --stanza=bench stanza-create >/dev/null
echo "loading pgbench -i -s $SCALE ..." >&2
as_pg "$PGBIN/pgbench" -q -i -s "$SCALE" -h "$dir" -p "$port" -U postgres postgres >/dev/null 2>&1
as_pg "$PGBIN/psql" -X -q -h "$dir" -p "$port" -U postgres -c CHECKPOINT postgres
size=$(as_pg "$PGBIN/psql" -X -q -t -A -h "$dir" -p "$port" -U postgres -c "SELECT sum(pg_database_size(oid)) FROM pg_database" postgres)
echo "database: $((size / 1000000)) MB" >&2

results="$work/results"
: >"$results"
# timed NAME CMD...: one run, as wall seconds, CPU seconds and peak RSS (KiB).
timed() {
  local name="$1"; shift
  /usr/bin/time -o "$work/time" -f "%e %U %S %M" "$@" >"$work/out" 2>"$work/err" || {
    echo "$name failed:" >&2; cat "$work/err" >&2; exit 1; }
  read -r wall user sys rss <"$work/time"
  echo "$name $wall $(echo "$user + $sys" | bc) $rss" >>"$results"
}
conn="host=$dir port=$port user=postgres"
pg_user=() # /usr/bin/time runs programs, not shell functions: as_pg spelled out
[ "$(id -u)" -eq 0 ] && pg_user=(runuser -u postgres --)
for run in $(seq "$RUNS"); do
  # pitr: each run's first backup into an empty repository (self-contained with --wal, so
  # it waits for no archive), then a second one into the same repository.
  timed pg_basebackup-Ft "${pg_user[@]}" "$PGBIN/pg_basebackup" -d "$conn" -D "$dir/pgbb" -Ft -X none -c fast
  rm -rf "$dir/pgbb"
  timed pg_basebackup-Ft-zstd "${pg_user[@]}" "$PGBIN/pg_basebackup" -d "$conn" -D "$dir/pgbb" -Ft -X none -c fast --compress=server-zstd:1
  rm -rf "$dir/pgbb"
  timed pgbackrest "${pg_user[@]}" pgbackrest --config="$work/pgbackrest.conf" --stanza=bench --type=full --start-fast backup
  "$PITR" init --repo "s3://pitr-test/pitr-$run" --pg "$conn" >/dev/null
  timed pitr "$PITR" backup --repo "s3://pitr-test/pitr-$run" --pg "$conn" --fast --wal
  timed pitr-again "$PITR" backup --repo "s3://pitr-test/pitr-$run" --pg "$conn" --fast --wal
  # The same into an encrypted repository (a key file): what encryption costs.
  head -c 32 /dev/urandom >"$work/key"
  "$PITR" init --encrypt --key-file "$work/key" --repo "s3://pitr-test/pitr-enc-$run" --pg "$conn" >/dev/null
  timed pitr-encrypted env PITR_KEY_FILE="$work/key" "$PITR" backup --repo "s3://pitr-test/pitr-enc-$run" --pg "$conn" --fast --wal
done
# And one that waits for its WAL to be archived by pitr wal-push, as pgBackRest's does.
timed pitr-archived "$PITR" backup --repo "s3://pitr-test/pitr-archive" --pg "$conn" --fast

echo
printf '%-24s %8s %9s %9s %10s\n' tool seconds "MB/s" "CPU s" "peak RSS"
awk -v size="$size" '
  { n[$1]++; wall[$1]+=$2; cpu[$1]+=$3; if ($4>rss[$1]) rss[$1]=$4; if (!($1 in order)) { order[$1]=++k; names[k]=$1 } }
  END {
    for (i=1;i<=k;i++) { t=names[i]; w=wall[t]/n[t];
      printf "%-24s %8.2f %9.0f %9.2f %7.0f MiB\n", t, w, size/1e6/w, cpu[t]/n[t], rss[t]/1024 }
    if (("pgbackrest" in wall) && ("pitr" in wall))
      printf "\npgbackrest / pitr time: %.2fx (mean of %d runs)\n", (wall["pgbackrest"]/n["pgbackrest"])/(wall["pitr"]/n["pitr"]), n["pitr"]
    if (("pitr-encrypted" in wall) && ("pitr" in wall))
      printf "pitr encrypted / plain time: %.2fx (mean of %d runs)\n", (wall["pitr-encrypted"]/n["pitr-encrypted"])/(wall["pitr"]/n["pitr"]), n["pitr"]
  }' "$results"
