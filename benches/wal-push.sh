#!/usr/bin/env bash
# pitr wal-push against pgBackRest archive-push, in one run, over the same WAL segments and
# the same S3 server:
#
#   benches/wal-push.sh            # 64 segments of each kind of WAL
#   SEGMENTS=128 KINDS=realistic AHEAD=0,4,8 benches/wal-push.sh
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
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/pitr/target}"
as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

packages=()
command -v pgbackrest >/dev/null || packages+=(pgbackrest)
command -v stunnel >/dev/null || packages+=(stunnel4)
command -v openssl >/dev/null || packages+=(openssl)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || packages+=(postgresql)
command -v pgbench >/dev/null || ls /usr/lib/postgresql/*/bin/pgbench >/dev/null 2>&1 || packages+=(postgresql-contrib)
if [ ${#packages[@]} -gt 0 ]; then
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${packages[@]}"
fi
cargo build --release --locked -p pitr -p testbed --bins
PITR="$CARGO_TARGET_DIR/release/pitr"
S3BIN="$CARGO_TARGET_DIR/release/pitr-test-s3"
PGBIN="$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)"

work="$(mktemp -d /tmp/pitr-bench.XXXXXX)"
chmod 755 "$work"
pids=()
clusters=()
cleanup() {
  if [ -n "${KEEP:-}" ]; then echo "kept $work (servers still running)" >&2; return; fi
  for d in "${clusters[@]}"; do as_pg "$PGBIN/pg_ctl" -D "$d" -m immediate stop >/dev/null 2>&1 || true; done
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
# PostgreSQL refuses to run as root: run it as postgres then.
as_pg() { if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# The S3 server, and a TLS front for it.
s3port="$(free_port)"
"$S3BIN" --port "$s3port" "$work/s3" >"$work/s3.env" &
pids+=($!)
tlsport="$(free_port)"
# A throwaway CA and a server certificate for 127.0.0.1 signed by it.
openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=pitr-bench-ca \
  -keyout "$work/ca.key" -out "$work/ca.crt" 2>/dev/null
openssl req -newkey rsa:2048 -nodes -subj /CN=127.0.0.1 \
  -keyout "$work/tls.key" -out "$work/tls.csr" 2>/dev/null
printf 'subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n' >"$work/tls.ext"
openssl x509 -req -in "$work/tls.csr" -CA "$work/ca.crt" -CAkey "$work/ca.key" -CAcreateserial \
  -days 2 -extfile "$work/tls.ext" -out "$work/tls.crt" 2>/dev/null
cat >"$work/stunnel.conf" <<CONF
foreground = yes
pid =
[s3]
accept = 127.0.0.1:$tlsport
connect = 127.0.0.1:$s3port
cert = $work/tls.crt
key = $work/tls.key
CONF
stunnel "$work/stunnel.conf" >"$work/stunnel.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do grep -q '^AWS_REGION=' "$work/s3.env" 2>/dev/null && break; sleep 0.1; done
set -a
# shellcheck disable=SC1091
. <(grep '^[A-Z_]*=' "$work/s3.env")
set +a
export AWS_ENDPOINT_URL="https://127.0.0.1:$tlsport" SSL_CERT_FILE="$work/ca.crt"

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

pgbackrest_conf() { # file repo-path data socket-dir port
  cat >"$1" <<CONF
[global]
repo1-type=s3
repo1-path=$2
repo1-s3-bucket=pitr-test
repo1-s3-endpoint=127.0.0.1
repo1-storage-port=$tlsport
repo1-storage-verify-tls=n
repo1-s3-uri-style=path
repo1-s3-region=$AWS_REGION
repo1-s3-key=$AWS_ACCESS_KEY_ID
repo1-s3-key-secret=$AWS_SECRET_ACCESS_KEY
compress-type=zst
compress-level=1
process-max=2
log-level-console=warn
log-level-file=off
lock-path=$work/pgbackrest-lock
spool-path=$work/pgbackrest-spool
[bench]
pg1-path=$3
pg1-socket-path=$4
pg1-port=$5
pg1-user=postgres
CONF
}

for kind in $KINDS; do
  dir="$work/$kind"
  mkdir -p "$dir/archive" "$dir/stage/global"
  [ "$(id -u)" -eq 0 ] && chown -R postgres "$dir"
  port="$(free_port)"
  as_pg "$PGBIN/initdb" -D "$dir/data" -U postgres -A trust --no-sync >/dev/null
  cat >>"$dir/data/postgresql.conf" <<CONF
port = $port
listen_addresses = ''
unix_socket_directories = '$dir'
archive_mode = on
archive_command = 'cp %p $dir/archive/%f'
max_wal_size = 4GB
fsync = off
CONF
  as_pg "$PGBIN/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w start >/dev/null
  clusters+=("$dir/data")
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
    pgbackrest --config="$dir/pgbackrest-$mode.conf" --stanza=bench stanza-create >/dev/null
    flag=--no-archive-async
    [ "$mode" = async ] && flag=--archive-async
    peers+=(--peer "pgbackrest-$mode=pgbackrest --config=$dir/pgbackrest-$mode.conf --stanza=bench --pg1-path=$dir/stage $flag archive-push %p")
  done
  echo "== $kind WAL" 
  "$PITR" bench wal-push --repo "s3://pitr-test/pitr-$kind" --from "$dir/archive" \
    --segments "$SEGMENTS" --ahead "$AHEAD" --compress-level 1 --data-dir "$dir/stage" "${peers[@]}"
  as_pg "$PGBIN/pg_ctl" -D "$dir/data" -m fast stop >/dev/null
done
