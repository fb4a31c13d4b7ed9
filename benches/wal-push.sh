#!/usr/bin/env bash
# pitr wal-push against pgBackRest archive-push, in one run, over the same WAL segments and
# the same S3 server:
#
#   benches/wal-push.sh            # 64 segments of each kind of WAL
#   SEGMENTS=128 KINDS=realistic AHEAD=0,4,8 benches/wal-push.sh
#   ENCRYPTION=none,file,passphrase ...  # also encrypted repositories (default none,file)
#   KEEP=1 ...                     # leave the work dir and servers up for a look
#
# For each kind of WAL ("realistic": rows of hex text that compress about 2x; "pgbench":
# pgbench -i, which compresses about 20x) it initdb's a cluster with the machine's
# PostgreSQL, writes WAL until SEGMENTS 16 MiB segments are archived by cp, then runs
# `pitr bench wal-push` over them: pitr at each AHEAD level, pgBackRest synchronous, and
# pgBackRest asynchronous with process-max=2, all with zstd level 1, each driven one
# archive_command call per segment in order, as PostgreSQL's archiver drives it. The S3
# server is the test bed's (pitr-test-s3); pgBackRest needs TLS, so stunnel fronts it and
# every tool, pitr included, goes through the same TLS front. Installs what it needs.
set -euo pipefail
cd "$(dirname "$0")/.."
SEGMENTS="${SEGMENTS:-64}"
KINDS="${KINDS:-realistic pgbench}"
AHEAD="${AHEAD:-0,8}"
ENCRYPTION="${ENCRYPTION:-none,file}"
# shellcheck source=benches/lib.sh
. benches/lib.sh

generate() { # kind dir port
  local kind="$1" dir="$2" port="$3" seg=$((16 << 20))
  local psql=("$PGBIN/psql" -X -q -t -A -v ON_ERROR_STOP=1 -h "$dir" -p "$port" -U postgres postgres)
  local start want
  start=$(as_pg "${psql[@]}" -c "SELECT pg_current_wal_lsn() - '0/0'")
  want=$((start + (SEGMENTS + 1) * seg))
  if [ "$kind" = realistic ]; then
    as_pg "${psql[@]}" -c "CREATE TABLE filler (id bigint, pad text); ALTER TABLE filler ALTER COLUMN pad SET STORAGE EXTERNAL"
  fi
  while [ "$(as_pg "${psql[@]}" -c "SELECT pg_current_wal_lsn() - '0/0'")" -lt "$want" ]; do
    if [ "$kind" = realistic ]; then
      as_pg "${psql[@]}" -c "INSERT INTO filler SELECT g, string_agg(md5(g::text || random()::text), '') FROM generate_series(1, 5000) g, generate_series(1, 30) r GROUP BY g"
    else
      as_pg "$PGBIN/pgbench" -q -i -s 10 -h "$dir" -p "$port" -U postgres postgres >/dev/null 2>&1
    fi
  done
  as_pg "${psql[@]}" -c "SELECT pg_switch_wal()" >/dev/null
}

for kind in $KINDS; do
  dir="$work/$kind"
  mkdir -p "$dir/archive" "$dir/stage/global"
  new_cluster "$dir"
  cat >>"$dir/data/postgresql.conf" <<CONF
archive_mode = on
archive_command = 'cp %p $dir/archive/%f'
max_wal_size = 4GB
fsync = off
CONF
  start_cluster "$dir"
  echo "generating $SEGMENTS segments of $kind WAL ..." >&2
  generate "$kind" "$dir" "$port"
  for _ in $(seq 600); do
    [ "$(find "$dir/archive" -name '????????????????????????' | wc -l)" -gt "$SEGMENTS" ] && break
    sleep 0.2
  done
  cp "$dir/data/global/pg_control" "$dir/stage/global/pg_control"
  peers=()
  for mode in sync async; do
    # A short repository path: the test S3 server keeps a multipart upload's state in a file
    # named after the base64 of the whole key, and a long key passes the 255-byte name limit
    # (a 500 on CreateMultipartUpload, which pgBackRest uses for objects over 5 MiB).
    pgbackrest_conf "$dir/pgbackrest-$mode.conf" "/pgb-${kind:0:1}${mode:0:1}" "$dir/data" "$dir" "$port"
    # A spool of its own: pgBackRest's asynchronous archive-push answers a call from the
    # `.ok` a spool holds for that segment name, and every kind's cluster has the same
    # segment names (a shared spool made the second kind's calls return at once).
    sed -i "s|^spool-path=.*|spool-path=$dir/pgbackrest-spool-$mode|" "$dir/pgbackrest-$mode.conf"
    pgbackrest --config="$dir/pgbackrest-$mode.conf" --stanza=bench stanza-create >/dev/null
    flag=--no-archive-async
    [ "$mode" = async ] && flag=--archive-async
    peers+=(--peer "pgbackrest-$mode=pgbackrest --config=$dir/pgbackrest-$mode.conf --stanza=bench --pg1-path=$dir/stage $flag archive-push %p")
  done
  echo "== $kind WAL" 
  "$PITR" bench wal-push --repo "s3://pitr-test/pitr-$kind" --from "$dir/archive" \
    --segments "$SEGMENTS" --ahead "$AHEAD" --encryption "$ENCRYPTION" --compress-level 1 --data-dir "$dir/stage" "${peers[@]}"
  as_pg "$PGBIN/pg_ctl" -D "$dir/data" -m fast stop >/dev/null
done
