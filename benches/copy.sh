#!/usr/bin/env bash
# pitr copy against aws s3 sync (awscli), between two of the test bed's S3 servers over
# plain HTTP on 127.0.0.1: a cluster archives with pitr wal-push into the first and is
# backed up there; pgbench then writes WAL_MB of WAL; each tool copies the whole repository
# to the second server (pitr copy --parallel 8 into a new location; aws s3 sync into the
# local disk and from there to the second server, since it copies between two endpoints
# only that way). Prints MB/s and objects/s of each, and the ratio.
#
#   benches/copy.sh                  # pgbench -i -s 70 (about 1.1 GB), then about 1 GB of WAL
#   SCALE=20 WAL_MB=300 benches/copy.sh
set -euo pipefail
cd "$(dirname "$0")/.."
SCALE="${SCALE:-70}"
WAL_MB="${WAL_MB:-1000}"
# shellcheck source=benches/lib.sh
. benches/lib.sh

# awscli from PyPI, in a venv of its own.
venv="$HOME/.cache/pitr/awscli-venv"
[ -x "$venv/bin/aws" ] || { python3 -m venv "$venv" && "$venv/bin/pip" install -q awscli; }
AWS="$venv/bin/aws"

# The second server, plain HTTP; the first, plain HTTP too for a fair comparison.
s3b="$(free_port)"
"$S3BIN" --port "$s3b" "$work/s3b" >"$work/s3b.env" &
pids+=($!)
for _ in $(seq 100); do grep -q '^AWS_REGION=' "$work/s3b.env" 2>/dev/null && break; sleep 0.1; done
unset AWS_ENDPOINT_URL
export PITR_S3_PATH_STYLE=true
a="s3://pitr-test/copy-a?endpoint=http://127.0.0.1:$s3port"
b="s3://pitr-test/copy-b?endpoint=http://127.0.0.1:$s3b"

dir="$work/db"
new_cluster "$dir"
cp "$PITR" "$work/pitr"
cat >>"$dir/data/postgresql.conf" <<CONF
archive_mode = on
archive_command = '$work/pitr wal-push --repo "$a" %p'
max_wal_size = 4GB
CONF
"$PITR" init --repo "$a" --data-dir "$dir/data" >/dev/null
[ "$(id -u)" -eq 0 ] && chown -R postgres "$work"
start_cluster "$dir"
psql() { as_pg "$PGBIN/psql" -X -q -t -A -v ON_ERROR_STOP=1 -h "$dir" -p "$port" -U postgres -c "$1" postgres; }
echo "loading pgbench -i -s $SCALE ..." >&2
as_pg "$PGBIN/pgbench" -q -i -s "$SCALE" -h "$dir" -p "$port" -U postgres postgres >/dev/null 2>&1
"$PITR" backup --repo "$a" --pg "host=$dir port=$port user=postgres" --fast >/dev/null
start_lsn="$(psql "SELECT pg_current_wal_lsn()")"
echo "writing $WAL_MB MB of WAL ..." >&2
while [ "$(psql "SELECT ((pg_current_wal_lsn() - '$start_lsn') / 1000000)::bigint")" -lt "$WAL_MB" ]; do
  as_pg "$PGBIN/pgbench" -n -c 4 -j 2 -T 10 -h "$dir" -p "$port" -U postgres postgres >/dev/null 2>&1
done
seg="$(psql "SELECT pg_walfile_name(pg_switch_wal())")"
for _ in $(seq 1200); do [ -f "$dir/data/pg_wal/archive_status/$seg.done" ] && break; sleep 0.25; done
as_pg "$PGBIN/pg_ctl" -D "$dir/data" -m fast stop >/dev/null
sync

now() { date +%s.%N; }
t0=$(now)
"$PITR" copy --parallel 8 --json --repo "$a" --to "$b" >"$work/copy.json"
tp=$(echo "$(now) - $t0" | bc)
aws() { "$AWS" --endpoint-url "$1" "${@:2}"; }
t0=$(now)
aws "http://127.0.0.1:$s3port" s3 sync --quiet "s3://pitr-test/copy-a" "$work/sync"
td=$(echo "$(now) - $t0" | bc)
t0=$(now)
aws "http://127.0.0.1:$s3b" s3 sync --quiet "$work/sync" "s3://pitr-test/copy-sync"
tu=$(echo "$(now) - $t0" | bc)
python3 - "$work/copy.json" "$tp" "$td" "$tu" <<'PY'
import json, sys
v = json.load(open(sys.argv[1])); tp, td, tu = (float(x) for x in sys.argv[2:5])
mb, n = v["bytes"] / 1e6, v["objects"]
print("pitr copy --parallel 8: %d objects, %.0f MB in %.2f s: %.0f MB/s, %.0f objects/s (each checked before, read back after)" % (n, mb, tp, mb / tp, n / tp))
print("aws s3 sync A -> disk -> B: %.2f s (%.2f + %.2f): %.0f MB/s, %.0f objects/s" % (td + tu, td, tu, mb / (td + tu), n / (td + tu)))
print("aws s3 sync / pitr copy time: %.2fx" % ((td + tu) / tp))
PY
