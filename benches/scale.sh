#!/usr/bin/env bash
# pitr at scale (README "Reliability", scale figures): wall time and peak RSS of each
# command against databases of many files, large databases and many WAL segments.
#
#   benches/scale.sh                                  # relations:100000 pgbench:1340 wal:20000
#   benches/scale.sh pgbench:70 pgbench:280           # one shape or several
#
# Shapes:
#   relations:N  N tables of one row each (N relation files, the many-small-files case)
#   pgbench:S    pgbench -i -s S (about 15 MB per unit of S: 1340 is about 20 GB)
#   wal:N        N WAL segments of 1 MiB (initdb --wal-segsize=1) archived by wal-push
#                after a backup: list, a restore to the end (planned over all of them),
#                verify, and an expire after a second backup that removes them
#
# For the database shapes: a self-contained backup (--wal), verify, a restore of it
# (--target-immediate, files only), a second backup after a few changes, and an expire
# that keeps only that one. Each on the test bed's S3 server behind a TLS front (as every
# bench here), one run each; prints shape, database size, files, command, seconds and
# peak RSS (GNU time), and appends them to $OUT if set. Needs about twice the largest
# database's size free on disk (the database and its restore), plus the repository.
set -euo pipefail
cd "$(dirname "$0")/.."
SHAPES=("$@")
[ ${#SHAPES[@]} -gt 0 ] || SHAPES=(relations:100000 pgbench:1340 wal:20000)
# shellcheck source=benches/lib.sh
. benches/lib.sh
cp "$PITR" "$work/pitr"
chmod 755 "$work/pitr"

row() { # shape size files command seconds rss_kib
  local line
  line="$(printf '%-18s %9s %8s %-22s %9s %8s MiB' "$1" "$2" "$3" "$4" "$5" $(($6 / 1024)))"
  echo "$line"
  [ -z "${OUT:-}" ] || echo "$line" >>"$OUT"
}
# timed SHAPE SIZE FILES NAME CMD...: runs CMD under GNU time, stdout to $work/out.
timed() {
  local shape="$1" size="$2" files="$3" name="$4"
  shift 4
  /usr/bin/time -o "$work/time" -f "%e %M" "$@" >"$work/out" 2>"$work/err" || {
    echo "$name failed:" >&2
    cat "$work/err" >&2
    exit 1
  }
  read -r secs rss <"$work/time"
  row "$shape" "$size" "$files" "$name" "$secs" "$rss"
}

# wal_commands REPO LIST RESTORE VERIFY EXPIRE [BACKUP-OPTION]...: for the WAL shape, times
# list, a restore to the end of the WAL (and prints its planning time), verify, and an
# expire after another backup, on REPO, under the names given.
wal_commands() {
  local r="$1" list="$2" restore="$3" verify="$4" expire="$5"
  shift 5
  timed "$shape" "$size" "$segs seg" "$list" "$PITR" list --repo "$r"
  timed "$shape" "$size" "$segs seg" "$restore" "$PITR" restore --repo "$r" \
    --to "$work/restored" --archive-mode off --json
  plan="$(python3 -c 'import json,sys; print("%.2f" % json.load(open(sys.argv[1]))["plan_seconds"])' "$work/out")"
  echo "  (of which planning: $plan s)"
  rm -rf "$work/restored"
  timed "$shape" "$size" "$segs seg" "$verify" "$PITR" verify --repo "$r"
  "$PITR" backup --repo "$r" --pg "$conn" --fast "$@" >/dev/null
  timed "$shape" "$size" "$segs seg" "$expire" "$PITR" expire --repo "$r" \
    --keep-last 1 --grace 0s
}

printf '%-18s %9s %8s %-22s %9s %12s\n' shape "DB MB" files command seconds "peak RSS"
n=0
for shape in "${SHAPES[@]}"; do
  kind="${shape%%:*}"
  count="${shape#*:}"
  n=$((n + 1))
  dir="$work/db$n"
  repo="s3://pitr-test/scale-$n"
  if [ "$kind" = wal ]; then
    mkdir -p "$dir"
    [ "$(id -u)" -eq 0 ] && chown -R postgres "$dir"
    port="$(free_port)"
    as_pg "$PGBIN/initdb" -D "$dir/data" -U postgres -A trust --no-sync --wal-segsize=1 >/dev/null
  else
    new_cluster "$dir"
  fi
  cat >>"$dir/data/postgresql.conf" <<CONF
port = $port
listen_addresses = ''
unix_socket_directories = '$dir'
max_wal_size = 4GB
max_locks_per_transaction = 1024
max_wal_senders = 4
fsync = off
wal_init_zero = off
archive_mode = on
archive_command = 'env PITR_REPO=$repo AWS_ACCESS_KEY_ID=$AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY=$AWS_SECRET_ACCESS_KEY AWS_REGION=$AWS_REGION AWS_ENDPOINT_URL=$AWS_ENDPOINT_URL PITR_S3_PATH_STYLE=true SSL_CERT_FILE=$SSL_CERT_FILE $work/pitr wal-push %p'
CONF
  chmod 644 "$work/ca.crt"
  start_cluster "$dir"
  conn="host=$dir port=$port user=postgres"
  psql=("$PGBIN/psql" -X -q -t -A -h "$dir" -p "$port" -U postgres postgres)
  export PITR_S3_PATH_STYLE=true
  "$PITR" init --repo "$repo" --pg "$conn" >/dev/null
  size_of() { as_pg "${psql[@]}" -c "SELECT (sum(pg_database_size(oid)) / 1000000)::bigint FROM pg_database"; }
  files_of() { as_pg find "$dir/data/base" -type f | wc -l; }

  case "$kind" in
  relations)
    per=5000
    for ((from = 1; from <= count; from += per)); do
      to=$((from + per - 1 < count ? from + per - 1 : count))
      as_pg "${psql[@]}" -c "DO \$\$ BEGIN FOR i IN $from..$to LOOP
        EXECUTE format('CREATE TABLE r%s (id int)', i);
        EXECUTE format('INSERT INTO r%s VALUES (%s)', i, i); END LOOP; END \$\$"
    done
    ;;
  pgbench)
    as_pg "$PGBIN/pgbench" -q -i -I dtGp -s "$count" -h "$dir" -p "$port" -U postgres postgres >/dev/null 2>&1
    ;;
  wal)
    as_pg "${psql[@]}" -c "CREATE TABLE t (id int)"
    ;;
  *)
    echo "unknown shape $shape" >&2
    exit 2
    ;;
  esac
  as_pg "${psql[@]}" -c CHECKPOINT
  size="$(size_of)"
  files="$(files_of)"

  if [ "$kind" = wal ]; then
    "$PITR" backup --repo "$repo" --pg "$conn" --fast >/dev/null
    # Each round: a little WAL, then a switch to the next segment; archived as it goes.
    made=0
    while [ "$made" -lt "$count" ]; do
      batch=$((count - made < 500 ? count - made : 500))
      as_pg "${psql[@]}" -c "DO \$\$ BEGIN FOR i IN 1..$batch LOOP
        INSERT INTO t VALUES (i); PERFORM pg_switch_wal(); COMMIT; END LOOP; END \$\$"
      made=$((made + batch))
      # Archiving keeps up to within a batch (pg_wal stays small).
      for _ in $(seq 600); do
        [ "$(as_pg "${psql[@]}" -c "SELECT archived_count FROM pg_stat_archiver")" -ge $((made - 500)) ] && break
        sleep 0.2
      done
    done
    # The last segment written to, switched away from and archived.
    last="$(as_pg "${psql[@]}" -c "SELECT pg_walfile_name(pg_current_wal_lsn())")"
    as_pg "${psql[@]}" -c "SELECT pg_switch_wal()" >/dev/null
    for _ in $(seq 3000); do
      [ "$(as_pg "${psql[@]}" -c "SELECT coalesce(last_archived_wal >= '$last', false) FROM pg_stat_archiver")" = t ] && break
      sleep 0.2
    done
    segs="$("$PITR" list --repo "$repo" --json | python3 -c 'import json,sys; v=json.load(sys.stdin); print(sum(r.get("segments",0) for r in v.get("wal",[])))' 2>/dev/null || echo '?')"
    # The same repository read as a file:// one (the S3 server keeps objects as files
    # under bucket/key): pitr's own cost, without the test server's listing, which walks
    # its whole directory for each page of 1,000 keys.
    cp -a "$work/s3/pitr-test/scale-$n" "$work/fsrepo"
    rm -rf "$work/fsrepo/running"
    fsrepo="file://$work/fsrepo"
    wal_commands "$fsrepo" "list (file://)" "restore (file://)" "verify (file://)" \
      "expire (file://)" --wal
    rm -rf "$work/fsrepo"
    wal_commands "$repo" "list" "restore (to the end)" "verify" "expire (keep-last 1)"
  else
    timed "$shape" "$size" "$files" "backup" "$PITR" backup --repo "$repo" --pg "$conn" --fast --wal
    timed "$shape" "$size" "$files" "verify" "$PITR" verify --repo "$repo"
    timed "$shape" "$size" "$files" "restore" "$PITR" restore --repo "$repo" --to "$work/restored" \
      --target-immediate --archive-mode off
    rm -rf "$work/restored"
    as_pg "${psql[@]}" -c "CREATE TABLE changed AS SELECT 1 AS x"
    timed "$shape" "$size" "$files" "backup (second)" "$PITR" backup --repo "$repo" --pg "$conn" --fast --wal
    timed "$shape" "$size" "$files" "expire (keep-last 1)" "$PITR" expire --repo "$repo" \
      --keep-last 1 --grace 0s
  fi
  as_pg "$PGBIN/pg_ctl" -D "$dir/data" -m immediate stop >/dev/null
  rm -rf "$dir"
done
