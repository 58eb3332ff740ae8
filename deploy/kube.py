#!/usr/bin/env python3
"""Checks what kubernetes-validate cannot: that the manifests in
deploy/kubernetes agree with each other and with the tether.toml they ship.

    kube.py check                 all the checks below; one line per problem, exit 1
    kube.py toml OUT              write the ConfigMap's tether.toml to OUT (for `tether check`)

- kustomization.yaml lists every manifest of the directory (but *.example.yaml)
  and nothing that is missing;
- the Deployment runs >= 2 replicas, every ${VAR} of tether.toml is set from
  the `tether` Secret, the ConfigMap is mounted at the --config path;
- its ports, probes (/healthz liveness, /readyz readiness) and Services match
  listen.http / listen.admin; the workers' headless Service is the name and
  port of [discovery];
- terminationGracePeriodSeconds covers preStop + shutdown.grace +
  state.restore_timeout, so a rolling update drains before SIGKILL;
- non-root, read-only root filesystem, no privilege escalation, memory
  request and limit set; the PodDisruptionBudget selects the pods.
"""

import re
import sys
import tomllib
from pathlib import Path

import yaml

DIR = Path(__file__).resolve().parent / "kubernetes"


def load_all():
    """{kind/name: object} of every manifest, and their files."""
    objs, files = {}, {}
    for path in sorted(DIR.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc:
                continue
            key = f"{doc['kind']}/{doc.get('metadata', {}).get('name', '')}"
            objs[key] = doc
            files[key] = path.name
    return objs, files


UNITS = {
    **dict.fromkeys(["nsec", "ns"], 1e-9),
    **dict.fromkeys(["usec", "us"], 1e-6),
    **dict.fromkeys(["msec", "ms"], 1e-3),
    **dict.fromkeys(["seconds", "second", "sec", "s"], 1),
    **dict.fromkeys(["minutes", "minute", "min", "m"], 60),
    **dict.fromkeys(["hours", "hour", "hr", "h"], 3600),
    **dict.fromkeys(["days", "day", "d"], 86400),
    **dict.fromkeys(["weeks", "week", "w"], 604800),
}


def seconds(text, key):
    """A tether duration in seconds. tether reads them with humantime
    ("30s", "30 seconds", "1m 30s"); the units here are humantime's up to
    weeks."""
    parts = re.findall(r"(\d+)\s*([A-Za-z]+)", text)
    if not parts or re.sub(r"(\d+)\s*([A-Za-z]+)", "", text).strip():
        raise SystemExit(f"{key}: cannot read duration {text!r}")
    total = 0.0
    for n, unit in parts:
        if unit not in UNITS:
            raise SystemExit(f"{key}: unknown unit {unit!r} in {text!r}")
        total += int(n) * UNITS[unit]
    return total


def port_of(addr):
    return int(addr.rsplit(":", 1)[1])


def toml_text(objs):
    cm = objs.get("ConfigMap/tether-config")
    if not cm or "tether.toml" not in cm.get("data", {}):
        raise SystemExit("ConfigMap tether-config with data.tether.toml not found")
    return cm["data"]["tether.toml"]


def check(objs, files):
    problems = []

    def need(cond, msg):
        if not cond:
            problems.append(msg)

    # kustomization.yaml
    kust = yaml.safe_load((DIR / "kustomization.yaml").read_text())
    listed = kust.get("resources", [])
    manifests = {p.name for p in DIR.glob("*.yaml")} - {"kustomization.yaml"}
    manifests = {m for m in manifests if not m.endswith(".example.yaml")}
    for r in listed:
        need((DIR / r).exists(), f"kustomization.yaml lists {r}, which does not exist")
    for m in sorted(manifests - set(listed)):
        problems.append(f"{m} is not listed in kustomization.yaml resources")

    conf = tomllib.loads(toml_text(objs))
    dep = objs.get("Deployment/tether")
    if not dep:
        return problems + ["Deployment tether not found"]
    spec = dep["spec"]
    pod = spec["template"]["spec"]
    labels = spec["template"]["metadata"]["labels"]
    need(spec.get("replicas", 1) >= 2, "Deployment: replicas must be >= 2")
    ctr = next((c for c in pod["containers"] if c["name"] == "tether"), None)
    if ctr is None:
        return problems + ["Deployment: no container named tether"]

    # Environment: every ${VAR} comes from the Secret.
    env = {e["name"]: e for e in ctr.get("env", [])}
    for var in sorted(set(re.findall(r"\$\{(\w+)\}", toml_text(objs)))):
        e = env.get(var)
        ref = (e or {}).get("valueFrom", {}).get("secretKeyRef", {})
        need(ref.get("name") == "tether", f"Deployment: {var} (used in tether.toml) is not set from the tether Secret")
    need(conf.get("state", {}).get("store", "").startswith("${"),
         "tether.toml: state.store must come from the Secret (a ${VAR}), PostgreSQL for several replicas")

    # The config file is the ConfigMap.
    args = ctr.get("args", [])
    cfg = args[args.index("--config") + 1] if "--config" in args else None
    need(cfg is not None, "Deployment: no --config argument")
    vols = {v["name"]: v for v in pod.get("volumes", [])}
    mounted = False
    for vm in ctr.get("volumeMounts", []):
        v = vols.get(vm["name"], {})
        if v.get("configMap", {}).get("name") == "tether-config" and cfg == vm["mountPath"].rstrip("/") + "/tether.toml":
            mounted = True
    need(mounted, f"Deployment: --config {cfg} is not tether.toml of the mounted ConfigMap tether-config")

    # Ports, probes, Services.
    ports = {p["name"]: p["containerPort"] for p in ctr.get("ports", [])}
    listen = conf.get("listen", {})
    need(ports.get("http") == port_of(listen.get("http", ":0")), "Deployment: port http differs from listen.http")
    need(ports.get("admin") == port_of(listen.get("admin", ":0")), "Deployment: port admin differs from listen.admin")
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = ctr.get(probe, {}).get("httpGet", {})
        need(get.get("path") == path and get.get("port") in ("admin", ports.get("admin")),
             f"Deployment: {probe} must GET {path} on the admin port")
    for name, port in (("tether", "http"), ("tether-admin", "admin")):
        svc = objs.get(f"Service/{name}")
        need(svc is not None, f"Service {name} not found")
        if svc:
            need(all(labels.get(k) == v for k, v in svc["spec"]["selector"].items()),
                 f"Service {name}: selector does not match the tether pods")
            need(any(p.get("targetPort") in (port, ports.get(port)) for p in svc["spec"]["ports"]),
                 f"Service {name}: no port targets the container's {port} port")
    disc = conf.get("discovery")
    need(disc is not None, "tether.toml: no [discovery]")
    if disc:
        name = disc.get("dns", "").split(".")[0]
        svc = objs.get(f"Service/{name}")
        need(svc is not None, f"[discovery] dns {disc.get('dns')!r}: no Service {name} in the kit")
        if svc:
            need(svc["spec"].get("clusterIP") == "None", f"Service {name}: must be headless (clusterIP: None) for [discovery]")
            need(any(p["port"] == disc.get("port") for p in svc["spec"]["ports"]),
                 f"Service {name}: no port {disc.get('port')} (discovery.port)")

    # Draining: preStop + grace + capture flush fit in the grace period.
    pre = ctr.get("lifecycle", {}).get("preStop", {})
    cmd = pre.get("exec", {}).get("command", [])
    if pre.get("sleep"):
        pre_s = pre["sleep"]["seconds"]
    elif len(cmd) == 2 and cmd[0].endswith("sleep"):
        pre_s = float(cmd[1])
    else:
        pre_s = None
    need(pre_s is not None and pre_s > 0, "Deployment: preStop must sleep so endpoints are removed before SIGTERM")
    grace = seconds(conf.get("shutdown", {}).get("grace", "30s"), "shutdown.grace")
    flush = seconds(conf.get("state", {}).get("restore_timeout", "5s"), "state.restore_timeout")
    total = pod.get("terminationGracePeriodSeconds", 30)
    if pre_s is not None:
        need(total >= pre_s + grace + flush,
             f"Deployment: terminationGracePeriodSeconds {total} < preStop {pre_s:g} + shutdown.grace {grace:g}"
             f" + state.restore_timeout {flush:g}: SIGKILL would cut the drain")
    roll = spec.get("strategy", {}).get("rollingUpdate", {})
    need(roll.get("maxUnavailable") in (0, "0", "0%"), "Deployment: rollingUpdate.maxUnavailable must be 0")

    # Security and resources.
    psc, csc = pod.get("securityContext", {}), ctr.get("securityContext", {})
    need(psc.get("runAsNonRoot") is True or csc.get("runAsNonRoot") is True, "Deployment: runAsNonRoot must be true")
    need((csc.get("runAsUser") or psc.get("runAsUser") or 0) != 0, "Deployment: runAsUser must be non-zero")
    need(csc.get("readOnlyRootFilesystem") is True, "Deployment: readOnlyRootFilesystem must be true")
    need(csc.get("allowPrivilegeEscalation") is False, "Deployment: allowPrivilegeEscalation must be false")
    res = ctr.get("resources", {})
    need("memory" in res.get("requests", {}) and "memory" in res.get("limits", {}),
         "Deployment: memory request and limit must be set")

    pdb = next((o for k, o in objs.items() if k.startswith("PodDisruptionBudget/")), None)
    need(pdb is not None, "no PodDisruptionBudget")
    if pdb:
        sel = pdb["spec"]["selector"]["matchLabels"]
        need(all(labels.get(k) == v for k, v in sel.items()), "PodDisruptionBudget: selector does not match the tether pods")
        need(pdb["spec"].get("minAvailable", 0) in range(1, spec.get("replicas", 1)),
             "PodDisruptionBudget: minAvailable must be at least 1 and below replicas")
    return problems


def main(argv):
    objs, files = load_all()
    if argv[:1] == ["toml"] and len(argv) == 2:
        Path(argv[1]).write_text(toml_text(objs))
        return 0
    if argv == ["check"]:
        problems = check(objs, files)
        for p in problems:
            print(p)
        if not problems:
            print(f"deploy/kubernetes: {len(objs)} objects consistent with each other and with tether.toml")
        return 1 if problems else 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
