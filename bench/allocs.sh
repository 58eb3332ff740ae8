#!/usr/bin/env bash
# Heap allocations per proxied request, counted exactly in the tether process:
# uprobes (perf) on the allocator's entry points, h2load against a one-thread
# tether in front of the fast origin (`examples/origin.rs`), sticky cookie on
# every request, HTTP/1.1 keep-alive, HTTP/1.1 over TLS and HTTP/2 over TLS.
#
#   sudo bash bench/allocs.sh            # N=20000 requests per scenario
#
# Needs root (uprobes) and perf (Debian linux-perf, installed if missing).
# Counts calls, not bytes; the allocator in use (mimalloc, or glibc malloc
# when tether is built without it) is probed whichever it is. Loopback only;
# everything it starts is stopped by PID on exit.
set -euo pipefail
cd "$(dirname "$0")/.."

N=${N:-20000}
CONNS=${CONNS:-64}
need() { command -v "$1" >/dev/null 2>&1; }
if ! need perf || ! need h2load || ! need openssl; then
  echo "installing linux-perf nghttp2-client openssl from Debian packages" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq linux-perf nghttp2-client openssl >/dev/null
fi
cargo build --release --locked --bin tether --example origin >&2
BIN=$(pwd)/target/release/tether

WORK=$(mktemp -d /tmp/tether-allocs.XXXXXX)
PIDS=()
PROBES=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  [ ${#PROBES[@]} -eq 0 ] || perf probe -q -d 'tether_alloc:*' 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

# The allocator's entry points: mimalloc's (linked into tether) when present,
# else glibc's.
LIBC=$(ldd "$BIN" | awk '/libc\.so/{print $3}')
EVENTS=()
# -f: another probe may already sit on the same address (perf then names
# this one with a suffix); every tether_alloc event is counted and removed.
perf probe -q -d 'tether_alloc:*' 2>/dev/null || true
probe() { # probe BINARY SYMBOL
  if perf probe -q -f -x "$1" -a "tether_alloc:$2=$2" 2>/dev/null; then
    EVENTS+=("$2"); PROBES+=("$2")
  fi
}
if nm "$BIN" 2>/dev/null | grep ' T mi_malloc_aligned$' >/dev/null; then
  for s in mi_malloc_aligned mi_zalloc_aligned mi_realloc_aligned; do probe "$BIN" "$s"; done
else
  for s in malloc calloc realloc; do probe "$LIBC" "$s"; done
fi
[ ${#EVENTS[@]} -gt 0 ] || { echo "could not place allocator probes" >&2; exit 1; }

O1=18581 O2=18582 T_HTTP=18500 T_TLS=18543 T_ADMIN=18599
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
  -subj /CN=localhost -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" \
  -keyout "$WORK/key.pem" -out "$WORK/cert.pem" 2>/dev/null
target/release/examples/origin 127.0.0.1:$O1 127.0.0.1:$O2 &
PIDS+=($!)
cat > "$WORK/tether.toml" <<CFG
[runtime]
threads = 1
[listen]
http = "127.0.0.1:$T_HTTP"
https = "127.0.0.1:$T_TLS"
admin = "127.0.0.1:$T_ADMIN"
[tls]
cert = "$WORK/cert.pem"
key = "$WORK/key.pem"
[affinity]
keys = ["$(head -c 32 /dev/urandom | base64)"]
[[backends]]
id = "o1"
url = "http://127.0.0.1:$O1"
[[backends]]
id = "o2"
url = "http://127.0.0.1:$O2"
[state]
store = "sqlite://$WORK/tether.db"
CFG
RUST_LOG=warn "$BIN" --config "$WORK/tether.toml" 2>"$WORK/tether.log" &
T_PID=$!; PIDS+=($T_PID)
for _ in $(seq 1 100); do curl -fsS -o /dev/null "http://127.0.0.1:$T_HTTP/" 2>/dev/null && break; sleep 0.1; done
COOKIE=$(curl -s -D - -o /dev/null "http://127.0.0.1:$T_HTTP/" | sed -n 's/^set-cookie: \(tether=[^;]*\).*/\1/ip' | head -1)
[ -n "$COOKIE" ] || { echo "no affinity cookie from tether" >&2; exit 1; }

echo "allocations per request in tether (probes: ${EVENTS[*]})"
for scen in h1 tls h2; do
  case $scen in
    h1) load=(h2load --h1 "http://127.0.0.1:$T_HTTP/") ;;
    tls) load=(h2load --h1 "https://127.0.0.1:$T_TLS/") ;;
    h2) load=(h2load "https://127.0.0.1:$T_TLS/") ;;
  esac
  # Warm up: connections, pools and buffers exist before counting.
  "${load[@]}" -n "$N" -c "$CONNS" -H "cookie: $COOKIE" >/dev/null
  perf stat -x, -e 'tether_alloc:*' -p "$T_PID" -o "$WORK/stat.$scen" &
  SP=$!
  sleep 0.5
  done_n=$("${load[@]}" -n "$N" -c "$CONNS" -H "cookie: $COOKIE" \
    | sed -n 's/^requests: [0-9]* total, [0-9]* started, \([0-9]*\) done.*/\1/p')
  sleep 0.3
  kill -INT "$SP"; wait "$SP" || true
  awk -F, -v n="$done_n" -v s="$scen" '
    $3 ~ /tether_alloc/ { total += $1; split($3, e, ":"); parts = parts sprintf(" %s %.1f", e[2], $1 / n) }
    END { printf "  %-4s %6.1f per request (%s requests;%s)\n", s, total / n, n, parts }' "$WORK/stat.$scen"
done
