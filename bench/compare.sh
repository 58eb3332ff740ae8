#!/usr/bin/env bash
# Load comparison: tether vs HAProxy vs nginx (and direct-to-origin as the
# ceiling, and hyper's server and client with nothing in between as the
# floor any hyper-based proxy pays), all on loopback, in one run. The proxy under test is pinned to
# core 0 with one thread; the load generator and the origins run on core 1.
#
#   bash bench/compare.sh                 # 3 repetitions of 10 s per scenario
#   REPS=1 DUR=3 bash bench/compare.sh    # quick look
#   FEATURES=aws-lc-rs bash bench/compare.sh   # rustls on aws-lc-rs, not ring
#
# Prints, per scenario and proxy: req/s, p50/p99 latency, the proxy's CPU
# microseconds per request and its RSS; then tether's ratio to each peer
# (and the floor's to HAProxy) per repetition and the median of those ratios. Everything it starts is stopped
# by PID on exit. Two more scenarios follow the repetitions: tether's RSS
# with PINS (100000) live pins, and the latency a restore of an ENTRIES
# (200) entry thread adds to the first request after its worker is killed.
set -euo pipefail
cd "$(dirname "$0")/.."

REPS=${REPS:-3}
DUR=${DUR:-10}
CONNS=${CONNS:-64}
PROXY_CPU=${PROXY_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}

need() { command -v "$1" >/dev/null 2>&1; }
if ! need haproxy || ! need nginx || ! need wrk || ! need h2load || ! need openssl; then
  echo "installing haproxy nginx wrk h2load openssl from Debian packages" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq haproxy nginx-light wrk nghttp2-client openssl >/dev/null
fi
# FEATURES=aws-lc-rs measures tether with rustls on aws-lc-rs instead of ring.
cargo build --release --locked ${FEATURES:+--features "$FEATURES"} \
  --bin tether --example origin --example restore_latency --example hyper_floor >&2

WORK=$(mktemp -d /tmp/tether-bench.XXXXXX)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  sleep 0.3
  for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT

# Ports (loopback only).
O1=18081 O2=18082
T_HTTP=18100 T_TLS=18443 T_ADMIN=18199
H_HTTP=18200 H_TLS=18243
N_HTTP=18300 N_TLS=18343
F_HTTP=18400 F_TLS=18444

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
  -subj /CN=localhost -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" \
  -keyout "$WORK/key.pem" -out "$WORK/cert.pem" 2>/dev/null
cat "$WORK/cert.pem" "$WORK/key.pem" > "$WORK/combined.pem"

taskset -c "$LOAD_CPU" target/release/examples/origin 127.0.0.1:$O1 127.0.0.1:$O2 &
PIDS+=($!)

KEY=$(head -c 32 /dev/urandom | base64)
# tether_toml FILE STORE_DB HEAD ID=PORT...: a one-thread tether config with
# HEAD (its [listen] and [tls]) and one backend per ID=PORT on loopback.
tether_toml() {
  local file=$1 db=$2 head=$3; shift 3
  {
    printf '[runtime]\nthreads = 1\n%s\n[affinity]\nkeys = ["%s"]\n' "$head" "$KEY"
    for b in "$@"; do
      printf '[[backends]]\nid = "%s"\nurl = "http://127.0.0.1:%s"\n' "${b%%=*}" "${b#*=}"
    done
    printf '[state]\nstore = "sqlite://%s"\n' "$db"
  } > "$file"
}
tether_toml "$WORK/tether.toml" "$WORK/tether.db" "[listen]
http = \"127.0.0.1:$T_HTTP\"
https = \"127.0.0.1:$T_TLS\"
admin = \"127.0.0.1:$T_ADMIN\"
[tls]
cert = \"$WORK/cert.pem\"
key = \"$WORK/key.pem\"" o1=$O1 o2=$O2
RUST_LOG=warn taskset -c "$PROXY_CPU" target/release/tether --config "$WORK/tether.toml" 2>"$WORK/tether.log" &
T_PID=$!; PIDS+=($T_PID)

cat > "$WORK/haproxy.cfg" <<CFG
global
  nbthread 1
  maxconn 8000
  tune.ssl.default-dh-param 2048
  ssl-default-bind-options ssl-min-ver TLSv1.2
defaults
  mode http
  timeout connect 5s
  timeout client 60s
  timeout server 60s
  http-reuse always
frontend fe
  bind 127.0.0.1:$H_HTTP
  bind 127.0.0.1:$H_TLS ssl crt $WORK/combined.pem alpn h2,http/1.1
  default_backend be
backend be
  balance roundrobin
  cookie SRV insert indirect nocache
  server o1 127.0.0.1:$O1 cookie o1
  server o2 127.0.0.1:$O2 cookie o2
CFG
taskset -c "$PROXY_CPU" haproxy -db -f "$WORK/haproxy.cfg" 2>"$WORK/haproxy.log" &
H_PID=$!; PIDS+=($H_PID)

mkdir -p "$WORK/nginx"
cat > "$WORK/nginx.conf" <<CFG
worker_processes 1;
worker_cpu_affinity auto;
error_log $WORK/nginx/error.log warn;
pid $WORK/nginx/nginx.pid;
events { worker_connections 4096; }
http {
  access_log off;
  # nginx closes a connection after 1000 requests by default; h2load does
  # not reconnect, so without this its HTTP/2 figure counts idle clients.
  keepalive_requests 100000000;
  client_body_temp_path $WORK/nginx;
  proxy_temp_path $WORK/nginx;
  upstream up {
    hash \$cookie_srv consistent;
    server 127.0.0.1:$O1;
    server 127.0.0.1:$O2;
    keepalive 128;
  }
  server {
    listen 127.0.0.1:$N_HTTP;
    listen 127.0.0.1:$N_TLS ssl http2;
    ssl_certificate $WORK/cert.pem;
    ssl_certificate_key $WORK/key.pem;
    ssl_protocols TLSv1.2 TLSv1.3;
    location / {
      proxy_pass http://up;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }
  }
}
CFG
taskset -c "$PROXY_CPU" nginx -c "$WORK/nginx.conf" -g 'daemon off;' 2>"$WORK/nginx.stderr" &
N_PID=$!; PIDS+=($N_PID)

# The floor: hyper's server and client with nothing of tether's in between
# (examples/hyper_floor.rs), plain and TLS, one thread each on the proxy core.
taskset -c "$PROXY_CPU" target/release/examples/hyper_floor 127.0.0.1:$F_HTTP 127.0.0.1:$O1 &
F_PID=$!; PIDS+=($F_PID)
taskset -c "$PROXY_CPU" target/release/examples/hyper_floor 127.0.0.1:$F_TLS 127.0.0.1:$O1 "$WORK/cert.pem" "$WORK/key.pem" &
FT_PID=$!; PIDS+=($FT_PID)

# Wait until everything answers.
for url in "http://127.0.0.1:$T_HTTP/" "http://127.0.0.1:$H_HTTP/" "http://127.0.0.1:$N_HTTP/" "http://127.0.0.1:$O1/" "http://127.0.0.1:$F_HTTP/"; do
  for _ in $(seq 1 100); do curl -fsS -o /dev/null "$url" 2>/dev/null && break; sleep 0.1; done
done

# Sticky cookies: each proxy's own.
T_COOKIE=$(curl -s -D - -o /dev/null "http://127.0.0.1:$T_HTTP/" | sed -n 's/^set-cookie: \(tether=[^;]*\).*/\1/ip' | head -1)
H_COOKIE=$(curl -s -D - -o /dev/null "http://127.0.0.1:$H_HTTP/" | sed -n 's/^set-cookie: \(SRV=[^;]*\).*/\1/ip' | head -1)
N_COOKIE="srv=o1"
if [ -z "$T_COOKIE" ] || [ -z "$H_COOKIE" ]; then
  echo "no sticky cookie from tether or haproxy" >&2
  curl -s -D - -o /dev/null "http://127.0.0.1:$H_HTTP/" >&2 || true
  tail -5 "$WORK/haproxy.log" "$WORK/tether.log" >&2 || true
  exit 1
fi

HZ=$(getconf CLK_TCK)
cpu_ticks() { # sum of utime+stime of the given PIDs and their children threads
  local t=0
  for p in "$@"; do
    [ -r "/proc/$p/stat" ] || continue
    t=$((t + $(awk '{print $14 + $15}' "/proc/$p/stat")))
  done
  echo "$t"
}
rss_kb() { local r=0; for p in "$@"; do r=$((r + $(awk '/VmRSS/{print $2}' "/proc/$p/status" 2>/dev/null || echo 0))); done; echo "$r"; }
nginx_pids() { echo "$N_PID $(pgrep -P "$N_PID" | tr '\n' ' ')"; }

# run SCENARIO PROXY PIDS... -- load command; prints one result line.
RESULTS="$WORK/results.tsv"
: > "$RESULTS"
run() {
  local rep=$1 scen=$2 proxy=$3; shift 3
  local pids=()
  while [ "$1" != "--" ]; do pids+=("$1"); shift; done; shift
  local before after out
  before=$(cpu_ticks "${pids[@]}")
  out=$("$@" 2>&1) || true
  after=$(cpu_ticks "${pids[@]}")
  local reqs rps p50 p99
  if [[ "$1" == *h2load* ]] || [[ "$*" == *h2load* ]]; then
    reqs=$(echo "$out" | sed -n 's/^requests: \([0-9]*\) total, [0-9]* started, \([0-9]*\) done, \([0-9]*\) succeeded.*/\3/p')
    rps=$(echo "$out" | sed -n 's/^finished in .*, \([0-9.]*\) req\/s.*/\1/p')
    p50=$(echo "$out" | awk '/^time for request:/{print $6}')   # mean (h2load has no percentiles)
    p99=$(echo "$out" | awk '/^time for request:/{print $5}')   # max
  else
    reqs=$(echo "$out" | awk '/requests in/{print $1}')
    rps=$(echo "$out" | awk '/^Requests\/sec/{print $2}')
    p50=$(echo "$out" | awk '$1=="50%"{print $2}')
    p99=$(echo "$out" | awk '$1=="99%"{print $2}')
  fi
  local cpu_us="-"
  if [ "$proxy" != direct ] && [ -n "$reqs" ] && [ "$reqs" -gt 0 ]; then
    cpu_us=$(awk -v d=$((after - before)) -v hz="$HZ" -v n="$reqs" 'BEGIN{printf "%.1f", d*1e6/hz/n}')
  fi
  local rss="-"
  [ "$proxy" != direct ] && rss=$(awk -v k="$(rss_kb "${pids[@]}")" 'BEGIN{printf "%.1f", k/1024}')
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$rep" "$scen" "$proxy" "${rps:-0}" "${p50:--}" "${p99:--}" "$cpu_us" "$rss" >> "$RESULTS"
}

WRK="taskset -c $LOAD_CPU wrk -t1 -c$CONNS -d${DUR}s --latency"
H2="taskset -c $LOAD_CPU h2load -c$CONNS -m1 -D$DUR"
for rep in $(seq 1 "$REPS"); do
  echo "repetition $rep/$REPS" >&2
  run "$rep" h1-sticky direct -- $WRK "http://127.0.0.1:$O1/"
  run "$rep" h1-sticky tether $T_PID -- $WRK -H "Cookie: $T_COOKIE" "http://127.0.0.1:$T_HTTP/"
  run "$rep" h1-sticky haproxy $H_PID -- $WRK -H "Cookie: $H_COOKIE" "http://127.0.0.1:$H_HTTP/"
  run "$rep" h1-sticky nginx $(nginx_pids) -- $WRK -H "Cookie: $N_COOKIE" "http://127.0.0.1:$N_HTTP/"
  run "$rep" h1-sticky floor $F_PID -- $WRK -H "Cookie: $N_COOKIE" "http://127.0.0.1:$F_HTTP/"
  run "$rep" tls-keepalive tether $T_PID -- $WRK -H "Cookie: $T_COOKIE" "https://127.0.0.1:$T_TLS/"
  run "$rep" tls-keepalive haproxy $H_PID -- $WRK -H "Cookie: $H_COOKIE" "https://127.0.0.1:$H_TLS/"
  run "$rep" tls-keepalive nginx $(nginx_pids) -- $WRK -H "Cookie: $N_COOKIE" "https://127.0.0.1:$N_TLS/"
  run "$rep" tls-keepalive floor $FT_PID -- $WRK -H "Cookie: $N_COOKIE" "https://127.0.0.1:$F_TLS/"
  run "$rep" h2-tls tether $T_PID -- $H2 -H "cookie: $T_COOKIE" "https://127.0.0.1:$T_TLS/"
  run "$rep" h2-tls haproxy $H_PID -- $H2 -H "cookie: $H_COOKIE" "https://127.0.0.1:$H_TLS/"
  run "$rep" h2-tls nginx $(nginx_pids) -- $H2 -H "cookie: $N_COOKIE" "https://127.0.0.1:$N_TLS/"
  run "$rep" h2-tls floor $FT_PID -- $H2 -H "cookie: $N_COOKIE" "https://127.0.0.1:$F_TLS/"
  run "$rep" tls-new-conn tether $T_PID -- $WRK -H "Connection: close" -H "Cookie: $T_COOKIE" "https://127.0.0.1:$T_TLS/"
  run "$rep" tls-new-conn haproxy $H_PID -- $WRK -H "Connection: close" -H "Cookie: $H_COOKIE" "https://127.0.0.1:$H_TLS/"
  run "$rep" tls-new-conn nginx $(nginx_pids) -- $WRK -H "Connection: close" -H "Cookie: $N_COOKIE" "https://127.0.0.1:$N_TLS/"
done

# Two threads: tether with `[runtime] threads = 2` against HAProxy with
# `nbthread 2`, HTTP/1.1 keep-alive with the sticky cookie. This machine has
# two cores, so proxy, origin and load generator all share both: the figures
# say how each proxy uses a second thread under contention, not how it
# scales on a bigger machine. THREADS2=0 skips it.
if [ "${THREADS2:-1}" = 1 ]; then
  T2_HTTP=18120 T2_ADMIN=18197 H2_HTTP=18220
  tether_toml "$WORK/tether2.toml" "$WORK/tether2.db" "[listen]
http = \"127.0.0.1:$T2_HTTP\"
admin = \"127.0.0.1:$T2_ADMIN\"" o1=$O1 o2=$O2
  sed -i 's/^threads = 1$/threads = 2/' "$WORK/tether2.toml"
  RUST_LOG=warn target/release/tether --config "$WORK/tether2.toml" 2>"$WORK/tether2.log" &
  T2_PID=$!; PIDS+=($T2_PID)
  sed -e 's/nbthread 1/nbthread 2/' -e "s/127.0.0.1:$H_HTTP/127.0.0.1:$H2_HTTP/" \
    -e "/127.0.0.1:$H_TLS/d" "$WORK/haproxy.cfg" > "$WORK/haproxy2.cfg"
  haproxy -db -f "$WORK/haproxy2.cfg" 2>"$WORK/haproxy2.log" &
  H2_PID=$!; PIDS+=($H2_PID)
  for url in "http://127.0.0.1:$T2_HTTP/" "http://127.0.0.1:$H2_HTTP/"; do
    for _ in $(seq 1 100); do curl -fsS -o /dev/null "$url" 2>/dev/null && break; sleep 0.1; done
  done
  T2_COOKIE=$(curl -s -D - -o /dev/null "http://127.0.0.1:$T2_HTTP/" | sed -n 's/^set-cookie: \(tether=[^;]*\).*/\1/ip' | head -1)
  H2_COOKIE=$(curl -s -D - -o /dev/null "http://127.0.0.1:$H2_HTTP/" | sed -n 's/^set-cookie: \(SRV=[^;]*\).*/\1/ip' | head -1)
  WRK2="wrk -t2 -c$CONNS -d${DUR}s --latency"
  for rep in $(seq 1 "$REPS"); do
    echo "two threads, repetition $rep/$REPS" >&2
    run "$rep" h1-2threads tether $T2_PID -- $WRK2 -H "Cookie: $T2_COOKIE" "http://127.0.0.1:$T2_HTTP/"
    run "$rep" h1-2threads haproxy $H2_PID -- $WRK2 -H "Cookie: $H2_COOKIE" "http://127.0.0.1:$H2_HTTP/"
  done
  kill "$T2_PID" "$H2_PID" 2>/dev/null || true
fi

# Live pins: PINS requests without a cookie each open a new session (a pin
# held in memory for its 24 h); tether's RSS before and after.
PINS=${PINS:-100000}
echo "opening $PINS sessions" >&2
RSS_BEFORE=$(rss_kb "$T_PID")
taskset -c "$LOAD_CPU" h2load --h1 -n "$PINS" -c "$CONNS" "http://127.0.0.1:$T_HTTP/" >/dev/null 2>&1 || true
sleep 1
RSS_AFTER=$(rss_kb "$T_PID")
LIVE=$(curl -s "http://127.0.0.1:$T_ADMIN/metrics" | awk '/^tether_backend_sessions/{s+=$2} END{print s+0}')

# Restore latency: two reference workers (`tether worker`) behind a second
# tether; SESSIONS conversations of ENTRIES entries are captured, one
# worker is killed with SIGKILL, and every moved session's next request is
# timed against the request after it.
SESSIONS=${SESSIONS:-200}
ENTRIES=${ENTRIES:-200}
W1=18091 W2=18092 R_HTTP=18110 R_ADMIN=18198
taskset -c "$LOAD_CPU" target/release/tether worker --id w1 --listen 127.0.0.1:$W1 2>/dev/null &
W1_PID=$!; PIDS+=($W1_PID)
taskset -c "$LOAD_CPU" target/release/tether worker --id w2 --listen 127.0.0.1:$W2 2>/dev/null &
PIDS+=($!)
tether_toml "$WORK/restore.toml" "$WORK/restore.db" "[listen]
http = \"127.0.0.1:$R_HTTP\"
admin = \"127.0.0.1:$R_ADMIN\"" w1=$W1 w2=$W2
RUST_LOG=warn taskset -c "$PROXY_CPU" target/release/tether --config "$WORK/restore.toml" 2>"$WORK/restore.log" &
PIDS+=($!)
for _ in $(seq 1 100); do curl -fsS -o /dev/null "http://127.0.0.1:$R_ADMIN/readyz" 2>/dev/null && break; sleep 0.1; done
echo "building $SESSIONS conversations of $ENTRIES entries" >&2
RESTORE_OUT="restore scenario failed (see $WORK/restore.log)"
if taskset -c "$LOAD_CPU" target/release/examples/restore_latency build \
    "http://127.0.0.1:$R_HTTP" "http://127.0.0.1:$R_ADMIN" "$SESSIONS" "$ENTRIES" "$WORK/sessions.tsv" >&2; then
  kill -9 "$W1_PID"
  RESTORE_OUT=$(taskset -c "$LOAD_CPU" target/release/examples/restore_latency measure \
    "http://127.0.0.1:$R_HTTP" "$WORK/sessions.tsv" w1 2>&1) || true
fi

echo
echo "rep  scenario        proxy     req/s      p50       p99       cpu_us/req  rss_MiB"
awk -F'\t' '{printf "%-4s %-15s %-9s %-10s %-9s %-9s %-11s %s\n", $1,$2,$3,$4,$5,$6,$7,$8}' "$RESULTS"
echo
echo "(h2-tls: h2load prints no percentiles; the p50 column is its mean, p99 its max)"
echo
echo "proxy / peer, req/s per repetition, and the median (higher is better);"
echo "floor is hyper's server and client alone (examples/hyper_floor.rs):"
for scen in h1-sticky tls-keepalive h2-tls tls-new-conn h1-2threads; do
  for pair in tether/haproxy tether/nginx tether/floor floor/haproxy; do
    awk -F'\t' -v s="$scen" -v me="${pair%/*}" -v p="${pair#*/}" '
      $2==s && $3==me {t[$1]=$4}
      $2==s && $3==p {q[$1]=$4}
      END {
        n=0; line="";
        for (r in t) if (q[r] > 0) { v[n++]=t[r]/q[r]; line=line sprintf(" %.2f", t[r]/q[r]) }
        asort(v); med = (n%2) ? v[(n+1)/2] : (v[n/2]+v[n/2+1])/2;
        if (n) printf "  %-14s %-6s vs %-8s%s   median %.2f\n", s, me, p, line, med
      }' "$RESULTS"
  done
done
echo
echo "tether CPU us/request vs peer, median of repetitions (lower is better):"
for scen in h1-sticky tls-keepalive h2-tls tls-new-conn h1-2threads; do
  awk -F'\t' -v s="$scen" '
    $2==s && $7!="-" {c[$3]=c[$3] " " $7}
    END { for (p in c) printf "  %-14s %-8s%s\n", s, p, c[p] }' "$RESULTS" | sort
done
echo
echo "live pins: $LIVE sessions held; tether RSS $(awk -v k="$RSS_BEFORE" 'BEGIN{printf "%.1f", k/1024}') MiB before opening $PINS sessions, $(awk -v k="$RSS_AFTER" 'BEGIN{printf "%.1f", k/1024}') MiB after"
echo
echo "$RESTORE_OUT"
cp "$RESULTS" "${OUT:-/tmp/tether-compare.tsv}"
echo
echo "raw results: ${OUT:-/tmp/tether-compare.tsv}"
