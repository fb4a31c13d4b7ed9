#!/usr/bin/env bash
# pitr backup's peak memory at several database sizes, to show it does not grow with them:
#
#   benches/backup-memory.sh                 # pgbench -i -s 10, 70 and 280 (0.16 to 4.4 GB)
#   SCALES="10 100" benches/backup-memory.sh
#
# For each scale it loads pgbench -i -s SCALE into a throwaway cluster of the machine's
# PostgreSQL and takes two pitr backups (--wal, self-contained) into one repository on the
# test bed's S3 server (behind the same stunnel TLS front as the other benches): the first
# stores everything, the second reads the first one's manifest and chunk table and stores
# only what changed. It prints the database size, chunks, wall time and peak RSS of each.
set -euo pipefail
cd "$(dirname "$0")/.."
SCALES="${SCALES:-10 70 280}"
# shellcheck source=benches/lib.sh
. benches/lib.sh

dir="$work/db"
new_cluster "$dir"
cat >>"$dir/data/postgresql.conf" <<CONF
max_wal_size = 8GB
max_wal_senders = 4
fsync = off
CONF
start_cluster "$dir"
conn="host=$dir port=$port user=postgres"
psql=("$PGBIN/psql" -X -q -t -A -h "$dir" -p "$port" -U postgres postgres)

printf '%-6s %9s %9s %-7s %8s %10s\n' scale "DB MB" chunks backup seconds "peak RSS"
for scale in $SCALES; do
  as_pg "$PGBIN/pgbench" -q -i -s "$scale" -h "$dir" -p "$port" -U postgres postgres >/dev/null 2>&1
  as_pg "${psql[@]}" -c CHECKPOINT
  size=$(as_pg "${psql[@]}" -c "SELECT sum(pg_database_size(oid)) FROM pg_database")
  "$PITR" init --repo "s3://pitr-test/mem-$scale" --pg "$conn" >/dev/null
  for run in first second; do
    /usr/bin/time -o "$work/time" -f "%e %M" "$PITR" backup --repo "s3://pitr-test/mem-$scale" \
      --pg "$conn" --fast --wal --json >"$work/out" 2>"$work/err" || {
      echo "backup failed:" >&2; cat "$work/err" >&2; exit 1; }
    read -r wall rss <"$work/time"
    chunks=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["chunks"])' "$work/out")
    printf '%-6s %9d %9s %-7s %8.2f %6d MiB\n' "$scale" $((size / 1000000)) "$chunks" "$run" "$wall" $((rss / 1024))
  done
done
