# Shared by the side-by-side benches (sourced, not run): installs what they need, builds
# pitr and the test bed's S3 server in release mode, starts that server with a stunnel TLS
# front (pgBackRest speaks only HTTPS to S3) and exports the AWS settings every tool uses.
# Defines: as_root, as_pg, free_port, new_cluster, start_cluster, pgbackrest_conf; $PITR,
# $PGBIN, $work, $tlsport;
# cleanup on exit stops the clusters in "${clusters[@]}" and the processes in "${pids[@]}".
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
# new_cluster DIR: initdb's DIR/data (owned by the server's user), listening only on a
# socket in DIR at a free port (set in $port); the caller appends its own settings to
# DIR/data/postgresql.conf, then runs start_cluster DIR.
new_cluster() {
  local dir="$1"
  mkdir -p "$dir"
  [ "$(id -u)" -eq 0 ] && chown -R postgres "$dir"
  port="$(free_port)"
  as_pg "$PGBIN/initdb" -D "$dir/data" -U postgres -A trust --no-sync >/dev/null
  printf "port = %s\nlisten_addresses = ''\nunix_socket_directories = '%s'\n" "$port" "$dir" >>"$dir/data/postgresql.conf"
}
# start_cluster DIR: starts DIR/data (log in DIR/server.log); stopped on exit.
start_cluster() {
  as_pg "$PGBIN/pg_ctl" -D "$1/data" -l "$1/server.log" -w start >/dev/null
  clusters+=("$1/data")
}

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

