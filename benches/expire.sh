#!/usr/bin/env bash
# pitr expire over a large synthetic repository: BACKUPS backups (one a day, back from now)
# and SEGMENTS WAL segments in a file:// repository (made by the hidden `pitr bench
# synth-repo`; WAL objects are a few bytes: expire lists them, never reads them). Each run
# expires a fresh copy with a calendar policy and prints its wall time and peak RSS.
#
#   benches/expire.sh                         # 1000 backups, 100000 segments, 3 runs
#   BACKUPS=200 SEGMENTS=20000 RUNS=1 benches/expire.sh
set -euo pipefail
cd "$(dirname "$0")/.."
BACKUPS="${BACKUPS:-1000}"
SEGMENTS="${SEGMENTS:-100000}"
RUNS="${RUNS:-3}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/pitr/target}"
cargo build --release --locked -p pitr --bins
PITR="$CARGO_TARGET_DIR/release/pitr"
work="$(mktemp -d /tmp/pitr-expire.XXXXXX)"
trap 'rm -rf "$work"' EXIT
"$PITR" bench synth-repo --to "$work/source" --backups "$BACKUPS" --segments "$SEGMENTS" >&2
for run in $(seq "$RUNS"); do
  rm -rf "$work/run"
  cp -a "$work/source" "$work/run"
  sync
  /usr/bin/time -f '%e %M' -o "$work/time" "$PITR" expire --repo "file://$work/run" \
    --keep-within 7d --keep-daily 7 --keep-weekly 4 --keep-monthly 12 --json >"$work/out.json"
  read -r secs rss <"$work/time"
  python3 - "$work/out.json" "$secs" "$rss" "$run" <<'PY'
import json, sys
v = json.load(open(sys.argv[1])); r = v["removed"]
kept = sum(1 for b in v["backups"] if b["kept"])
print("run %s: %s s, peak RSS %.0f MB: %d backups kept of %d, removed %d backups, %d WAL files, %d packs" % (
    sys.argv[4], sys.argv[2], int(sys.argv[3]) / 1024, kept, len(v["backups"]), r["backups"], r["wal_files"], r["packs"]))
PY
done
