#!/usr/bin/env bash
# pitr copy against aws s3 sync (awscli), between two of the test bed's S3 servers over
# plain HTTP on 127.0.0.1: a cluster archives with pitr wal-push into the first and is
# backed up there; pgbench then writes WAL_MB of WAL; each tool copies the whole repository
# to the second server (pitr copy --parallel 8 into a new location; aws s3 sync into the
# local disk and from there to the second server, since it copies between two endpoints
# only that way). Prints MB/s and objects/s of each, and the ratio; pitr copy within one
# server (server-side copies); and the baseline the issue's aim is stated against: the same
# objects read and written one at a time by curl, and 8 at a time.
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
b() { echo "s3://pitr-test/copy-b$1?endpoint=http://127.0.0.1:$s3b"; }

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
# pitr copy, three runs into new locations on the second server (the median is reported),
# and one into a new location on the first (the server copies each object itself).
tps=()
for i in 1 2 3; do
  t0=$(now)
  "$PITR" copy --parallel 8 --json --repo "$a" --to "$(b "$i")" >"$work/copy.json"
  tps+=("$(echo "$(now) - $t0" | bc)")
done
t0=$(now)
"$PITR" copy --parallel 8 --json --repo "$a" --to "s3://pitr-test/copy-same?endpoint=http://127.0.0.1:$s3port" >"$work/same.json"
tss=$(echo "$(now) - $t0" | bc)
aws() { "$AWS" --endpoint-url "$1" "${@:2}"; }
t0=$(now)
aws "http://127.0.0.1:$s3port" s3 sync --quiet "s3://pitr-test/copy-a" "$work/sync"
td=$(echo "$(now) - $t0" | bc)
t0=$(now)
aws "http://127.0.0.1:$s3b" s3 sync --quiet "$work/sync" "s3://pitr-test/copy-sync"
tu=$(echo "$(now) - $t0" | bc)

# The baseline the issue's aim is stated against: the same objects (the files aws s3 sync
# brought down) read one at a time from the first server and written one at a time to the
# second, by curl (SigV4, unsigned payload: no hashing on either side); then both with 8
# at once, each object read into /dev/shm and written from there, nothing checked.
(cd "$work/sync" && find . -type f -printf '%P\n' | sort) >"$work/keys"
s3curl() { curl -sS -f --aws-sigv4 "aws:amz:${AWS_REGION:-us-east-1}:s3" --user "$AWS_ACCESS_KEY_ID:$AWS_SECRET_ACCESS_KEY" -H "x-amz-content-sha256: UNSIGNED-PAYLOAD" "$@"; }
export -f s3curl
export s3port s3b work
t0=$(now)
while read -r k; do s3curl -o /dev/null "http://127.0.0.1:$s3port/pitr-test/copy-a/$k"; done <"$work/keys"
tg=$(echo "$(now) - $t0" | bc)
t0=$(now)
while read -r k; do s3curl -T "$work/sync/$k" "http://127.0.0.1:$s3b/pitr-test/raw-one/$k" >/dev/null; done <"$work/keys"
tw=$(echo "$(now) - $t0" | bc)
t0=$(now)
xargs -P 8 -I{} bash -c 't=$(mktemp -p /dev/shm); s3curl -o "$t" "http://127.0.0.1:$s3port/pitr-test/copy-a/{}" && s3curl -T "$t" "http://127.0.0.1:$s3b/pitr-test/raw-par/{}" >/dev/null; rm -f "$t"' <"$work/keys"
tr=$(echo "$(now) - $t0" | bc)
python3 - "$work/copy.json" "$work/same.json" "${tps[*]}" "$tss" "$td" "$tu" "$tg" "$tw" "$tr" "$(du -sb "$work/sync" | cut -f1)" "$(wc -l <"$work/keys")" <<'PY'
import json, sys
v = json.load(open(sys.argv[1])); same = json.load(open(sys.argv[2]))
tps = sorted(float(x) for x in sys.argv[3].split()); tp = tps[len(tps) // 2]
tss, td, tu, tg, tw, tr = (float(x) for x in sys.argv[4:10])
raw_mb, raw_n = int(sys.argv[10]) / 1e6, int(sys.argv[11])
mb, n = v["bytes"] / 1e6, v["objects"]
print("pitr copy --parallel 8: %d objects, %.0f MB in %.2f s (median of %s): %.0f MB/s, %.0f objects/s (each checked before, read back after)" % (n, mb, tp, " ".join("%.2f" % t for t in tps), mb / tp, n / tp))
print("pitr copy on one server (%d of %d objects copied by the server): %.2f s: %.0f MB/s" % (same["server_side"], same["objects"], tss, mb / tss))
print("aws s3 sync A -> disk -> B: %.2f s (%.2f + %.2f): %.0f MB/s, %.0f objects/s" % (td + tu, td, tu, mb / (td + tu), n / (td + tu)))
print("aws s3 sync / pitr copy time: %.2fx" % ((td + tu) / tp))
get1, put1 = raw_mb / tg, raw_mb / tw
print("one object at a time (curl, %d objects, %.0f MB): GET %.0f MB/s, PUT %.0f MB/s" % (raw_n, raw_mb, get1, put1))
aim = min(get1, put1) * 8
print("the aim's bound, slower side x 8: %.0f MB/s; pitr copy reaches %.0f%% of it" % (aim, 100 * (mb / tp) / aim))
print("GET+PUT 8 at once, nothing checked (curl via /dev/shm): %.2f s, %.0f MB/s; pitr copy reaches %.0f%% of it" % (tr, raw_mb / tr, 100 * (mb / tp) / (raw_mb / tr)))
PY
