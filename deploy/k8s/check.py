#!/usr/bin/env python3
"""Renders deploy/k8s as `kubectl kustomize` would (namespace, generated ConfigMap and
Secret, each component applied to a copy of what it patches) and checks what an operator
would otherwise find on day one. Needs PyYAML only (kubernetes-validate brings it), not
kubectl: Debian's kubectl is too old for this kustomization.

    check.py DIR [--out FILE]

DIR is deploy/k8s (with ../observability beside it, and secrets/redis.env from secrets.sh).
--out writes the rendered documents (for `python -m kubernetes_validate --strict`). Exit 0
with a summary line, or 1 listing every problem found. Run by tests/tests/k8s_manifests.rs.
"""

import argparse
import copy
import os
import sys

import yaml

WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet", "Job"}
LONG_RUNNING = {"Deployment", "StatefulSet", "DaemonSet"}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume"}
PROBES = ("startupProbe", "readinessProbe", "livenessProbe")
NODE_PORTS = {50052, 50053}
NODE_CALLERS = {"session-manager", "metering"}
# Containers on the internal plane: each must run mTLS (a cert-manager-style Secret mounted).
INTERNAL_PLANE = {"session-manager", "metering", "vm-pool", "executor"}
TLS_ENV = {"CAPSA_TLS_CERT": "tls.crt", "CAPSA_TLS_KEY": "tls.key", "CAPSA_TLS_CA": "ca.crt"}
# Where a container names another internal service: must be https:// under mTLS.
INTERNAL_URL_ARGS = ("--advertise-url=", "--executor-url=")
INTERNAL_URL_ENV = ("CAPSA_METERING_URL",)
# Memory vm-pool needs for itself beyond its VMs' budget (node.yaml's formula).
VM_POOL_OWN_MIB = 256


def load_docs(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def read_env_file(path):
    data = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith("#"):
                key, _, value = line.partition("=")
                data[key] = value
    return data


def merge(base, patch):
    """Strategic merge as kustomize applies it to these patches: maps merge, lists of named
    maps merge by name, other values are replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for k, v in patch.items():
            out[k] = merge(base[k], v) if k in base else copy.deepcopy(v)
        return out
    if (
        isinstance(base, list)
        and isinstance(patch, list)
        and all(isinstance(x, dict) and "name" in x for x in base + patch)
    ):
        out = [copy.deepcopy(x) for x in base]
        for item in patch:
            for i, existing in enumerate(out):
                if existing["name"] == item["name"]:
                    out[i] = merge(existing, item)
                    break
            else:
                out.append(copy.deepcopy(item))
        return out
    return copy.deepcopy(patch)


def render(root, problems):
    kpath = os.path.join(root, "kustomization.yaml")
    kust = yaml.safe_load(open(kpath))
    listed = kust.get("resources", [])
    present = sorted(
        f for f in os.listdir(root) if f.endswith((".yaml", ".yml")) and f != "kustomization.yaml"
    )
    for f in present:
        if f not in listed:
            problems.append(f"kustomization.yaml: {f} is not listed under resources")
    docs = []
    for f in listed:
        path = os.path.join(root, f)
        if not os.path.isfile(path):
            problems.append(f"kustomization.yaml: resource {f} does not exist")
            continue
        docs.extend(load_docs(path))
    for gen in kust.get("configMapGenerator", []):
        data = {}
        for spec in gen.get("files", []):
            key, _, src = spec.rpartition("=")
            src_path = os.path.join(root, src)
            if not os.path.isfile(src_path):
                problems.append(f"configMapGenerator {gen['name']}: {src} does not exist")
                continue
            data[key or os.path.basename(src)] = open(src_path).read()
        docs.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": gen["name"]}, "data": data})
    for gen in kust.get("secretGenerator", []):
        data = {}
        for spec in gen.get("files", []):
            key, _, src = spec.rpartition("=")
            src_path = os.path.join(root, src)
            if not os.path.isfile(src_path):
                problems.append(
                    f"secretGenerator {gen['name']}: {src} does not exist (run deploy/k8s/secrets.sh)"
                )
                continue
            data[key or os.path.basename(src)] = open(src_path).read()
        for src in gen.get("envs", []):
            src_path = os.path.join(root, src)
            if not os.path.isfile(src_path):
                problems.append(
                    f"secretGenerator {gen['name']}: {src} does not exist (run deploy/k8s/secrets.sh)"
                )
                continue
            data.update(read_env_file(src_path))
        docs.append(
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "type": gen.get("type", "Opaque"),
                "metadata": {"name": gen["name"]},
                "stringData": data,
            }
        )
    namespace = kust.get("namespace")
    for d in docs:
        if namespace and d.get("kind") not in CLUSTER_SCOPED:
            d.setdefault("metadata", {})["namespace"] = namespace
    # Components (enabled or not): each patch applied to a copy of its target, so what an
    # operator can switch on is checked too.
    variants = []
    for entry in sorted(os.listdir(root)):
        comp = os.path.join(root, entry, "kustomization.yaml")
        if not os.path.isfile(comp):
            continue
        ckust = yaml.safe_load(open(comp))
        if ckust.get("kind") != "Component":
            continue
        for p in ckust.get("patches", []):
            for patch in load_docs(os.path.join(root, entry, p["path"])):
                target = next(
                    (
                        d
                        for d in docs
                        if d.get("kind") == patch.get("kind")
                        and d["metadata"]["name"] == patch["metadata"]["name"]
                    ),
                    None,
                )
                if target is None:
                    problems.append(f"component {entry}: {p['path']} patches nothing in the base")
                    continue
                variants.append((entry, merge(target, patch)))
    return docs, variants


def pod_spec(doc):
    spec = doc["spec"]["template"]["spec"]
    return spec


def labels_match(selector, labels):
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items()) and all(
        (labels.get(e["key"]) in e.get("values", [])) == (e["operator"] == "In")
        for e in selector.get("matchExpressions", [])
    )


def mib(quantity):
    q = str(quantity)
    for suffix, factor in (("Gi", 1024), ("Mi", 1), ("G", 1000**3 / 2**20), ("M", 1000**2 / 2**20)):
        if q.endswith(suffix):
            return float(q[: -len(suffix)]) * factor
    return float(q) / 2**20


def arg_value(c, flag):
    """The value of `--flag=value` in a container's args, or None."""
    for a in c.get("args", []):
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def secret_named(docs, name):
    return next((d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"] == name), None)


def check_tls(c, cw, spec, docs, env, problems):
    """mTLS of an internal-plane container: returns whether it is on."""
    missing = [k for k in TLS_ENV if k not in env]
    if missing:
        problems.append(f"{cw}: no mTLS ({', '.join(missing)} unset): the internal plane would be plaintext")
        return False
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    user = c.get("securityContext", {}).get("runAsUser", spec.get("securityContext", {}).get("runAsUser", 0))
    fs_group = spec.get("securityContext", {}).get("fsGroup")
    for var, key in TLS_ENV.items():
        path = env[var].get("value", "")
        mount = next(
            (m for m in c.get("volumeMounts", []) if path.startswith(m["mountPath"].rstrip("/") + "/")), None
        )
        secret = volumes.get(mount["name"], {}).get("secret") if mount else None
        if secret is None:
            problems.append(f"{cw}: {var} {path} is not in a mounted Secret")
            continue
        doc = secret_named(docs, secret["secretName"])
        if doc is None:
            problems.append(f"{cw}: mounts Secret {secret['secretName']}, which is not defined")
            continue
        file = path[len(mount["mountPath"].rstrip("/")) + 1 :]
        if file != key or key not in {**doc.get("data", {}), **doc.get("stringData", {})}:
            problems.append(f"{cw}: {var} {path}: Secret {secret['secretName']} has no key {file} (cert-manager writes {key})")
        mode = secret.get("defaultMode", 0o644)
        if user != 0 and not mode & 0o004 and not (fs_group is not None and mode & 0o040):
            problems.append(
                f"{cw}: Secret {secret['secretName']} (mode {mode:04o}) is unreadable by uid {user}: no fsGroup"
            )
    for flag in INTERNAL_URL_ARGS:
        url = arg_value(c, flag[:-1])
        if url is not None and not url.startswith("https://"):
            problems.append(f"{cw}: {flag[:-1]} {url} is plaintext under mTLS")
    for var in INTERNAL_URL_ENV:
        url = env.get(var, {}).get("value")
        if url is not None and not url.startswith("https://"):
            problems.append(f"{cw}: {var} {url} is plaintext under mTLS")
    return True


def check_workload(doc, where, docs, problems):
    kind = doc["kind"]
    spec = pod_spec(doc)
    labels = doc["spec"]["template"]["metadata"].get("labels", {})
    if spec.get("automountServiceAccountToken") is not False:
        problems.append(f"{where}: automountServiceAccountToken is not false")
    sa = spec.get("serviceAccountName")
    if not sa:
        problems.append(f"{where}: no serviceAccountName (would run as `default`)")
    elif not any(d["kind"] == "ServiceAccount" and d["metadata"]["name"] == sa for d in docs):
        problems.append(f"{where}: ServiceAccount {sa} is not defined")
    guaranteed = True
    for c in spec.get("containers", []) + spec.get("initContainers", []):
        cw = f"{where} container {c['name']}"
        if "args" in c and "command" not in c:
            problems.append(
                f"{cw}: args without command (the image's ENTRYPOINT, e.g. `tini --`, would run the args)"
            )
        res = c.get("resources", {})
        for part in ("requests", "limits"):
            for r in ("cpu", "memory"):
                if r not in res.get(part, {}):
                    problems.append(f"{cw}: no resources.{part}.{r}")
        if res.get("requests") != res.get("limits"):
            guaranteed = False
        env = {e["name"]: e for e in c.get("env", [])}
        for e in env.values():
            ref = e.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                secret = next(
                    (d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"] == ref["name"]), None
                )
                if secret is None:
                    problems.append(f"{cw}: env {e['name']} refers to missing Secret {ref['name']}")
                elif ref["key"] not in {**secret.get("data", {}), **secret.get("stringData", {})}:
                    problems.append(f"{cw}: env {e['name']} refers to missing key {ref['name']}/{ref['key']}")
        image = c.get("image", "")
        capsa_service = image.startswith("capsa-") and not image.startswith("capsa-redis")
        mtls = c["name"] in INTERNAL_PLANE and kind in LONG_RUNNING and check_tls(c, cw, spec, docs, env, problems)
        if kind in LONG_RUNNING:
            for probe in PROBES:
                if probe not in c:
                    problems.append(f"{cw}: no {probe}")
            grpc_ports = [p["containerPort"] for p in c.get("ports", []) if p.get("name") == "grpc"]
            health = arg_value(c, "--health-listen")
            if mtls and grpc_ports:
                # The kubelet's gRPC probes present no client certificate: an mTLS port
                # refuses them, so they go to the plaintext health-only listener.
                if health is None:
                    problems.append(f"{cw}: mTLS on its gRPC port and no --health-listen: the kubelet's probes cannot pass")
                    grpc_ports = []
                else:
                    grpc_ports = [int(health.rsplit(":", 1)[1])]
            for port in grpc_ports:
                for probe in PROBES:
                    if c.get(probe, {}).get("grpc", {}).get("port") != port:
                        problems.append(f"{cw}: {probe} is not a grpc.health.v1 probe on {port}")
            if capsa_service:
                if "OTEL_EXPORTER_OTLP_ENDPOINT" not in env:
                    problems.append(f"{cw}: no OTEL_EXPORTER_OTLP_ENDPOINT (its metrics go nowhere)")
                if "POD_NAME" not in env and "CAPSA_INSTANCE_ID" not in env:
                    problems.append(f"{cw}: neither POD_NAME nor CAPSA_INSTANCE_ID (service.instance.id)")
        if c["name"] == "vm-pool":
            budget = env.get("CAPSA_VMPOOL_CAPACITY_MEMORY_MIB", {}).get("value")
            limit = res.get("limits", {}).get("memory")
            if budget is None or int(budget) == 0:
                problems.append(
                    f"{cw}: CAPSA_VMPOOL_CAPACITY_MEMORY_MIB unset: vm-pool would size its VMs by the host's memory, not this pod's limit"
                )
            elif limit is None or mib(limit) < int(budget) + VM_POOL_OWN_MIB:
                problems.append(
                    f"{cw}: memory limit {limit} does not hold the VMs' {budget} MiB + {VM_POOL_OWN_MIB} MiB for vm-pool"
                )
    if doc["metadata"]["name"] == "capsa-node" and not guaranteed:
        problems.append(f"{where}: not Guaranteed QoS (requests != limits): first evicted under pressure")
    if kind in LONG_RUNNING and not any(
        d["kind"] == "PodDisruptionBudget" and labels_match(d["spec"]["selector"], labels) for d in docs
    ):
        problems.append(f"{where}: no PodDisruptionBudget selects its pods")
    for v in spec.get("volumes", []):
        cm = v.get("configMap", {}).get("name")
        if cm and not any(d["kind"] == "ConfigMap" and d["metadata"]["name"] == cm for d in docs):
            problems.append(f"{where}: volume {v['name']} refers to missing ConfigMap {cm}")


def check_network_policies(docs, problems):
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    if not any(p["spec"].get("podSelector") == {} and not p["spec"].get("ingress") for p in policies):
        problems.append("NetworkPolicy: no default deny of ingress (podSelector {}, no ingress rules)")
    node_labels = {"app": "capsa-node"}
    node_policies = [p for p in policies if labels_match(p["spec"].get("podSelector", {}), node_labels)
                     and p["spec"].get("podSelector") != {}]
    if not node_policies:
        problems.append("NetworkPolicy: none selects the node pods (vm-pool 50052, executor 50053)")
    covered = set()
    for p in node_policies:
        for rule in p["spec"].get("ingress", []):
            sources = rule.get("from")
            if not sources:
                problems.append(f"NetworkPolicy {p['metadata']['name']}: lets anyone reach the node pods")
                continue
            for s in sources:
                app = s.get("podSelector", {}).get("matchLabels", {}).get("app")
                if set(s) != {"podSelector"} or app not in NODE_CALLERS:
                    problems.append(
                        f"NetworkPolicy {p['metadata']['name']}: lets {s} reach the node pods (only {sorted(NODE_CALLERS)} may)"
                    )
            covered |= {port["port"] for port in rule.get("ports", [])}
    if node_policies and not NODE_PORTS <= covered:
        problems.append(f"NetworkPolicy: node ports {sorted(NODE_PORTS - covered)} are not opened to their callers")
    redis = [p for p in policies if labels_match(p["spec"].get("podSelector", {}), {"app": "redis"})
             and p["spec"].get("podSelector") != {}]
    if not redis:
        problems.append("NetworkPolicy: none selects Redis")
    for p in redis:
        for rule in p["spec"].get("ingress", []):
            if not rule.get("from") or any(s.get("podSelector") == {} for s in rule["from"]):
                problems.append(f"NetworkPolicy {p['metadata']['name']}: lets any pod reach Redis")


def check(docs, variants):
    problems = []
    for d in docs:
        if d["kind"] == "ServiceAccount" and d.get("automountServiceAccountToken") is not False:
            problems.append(f"ServiceAccount {d['metadata']['name']}: automountServiceAccountToken is not false")
    for d in docs:
        if d["kind"] in WORKLOADS:
            check_workload(d, f"{d['kind']} {d['metadata']['name']}", docs, problems)
    for comp, d in variants:
        if d["kind"] in WORKLOADS:
            check_workload(d, f"{d['kind']} {d['metadata']['name']} (component {comp})", docs, problems)
    check_network_policies(docs, problems)
    if not any(
        d["kind"] == "HorizontalPodAutoscaler" and d["spec"]["scaleTargetRef"].get("name") == "session-manager"
        for d in docs
    ):
        problems.append("no HorizontalPodAutoscaler for session-manager")
    if not any(
        d["kind"] == "Job" and "create-api-key" in pod_spec(d)["containers"][0].get("args", []) for d in docs
    ):
        problems.append("no Job bootstrapping the first API key (create-api-key)")
    secret = next((d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"] == "capsa-redis"), None)
    if secret is None:
        problems.append("no Secret capsa-redis")
    else:
        url = secret.get("stringData", {}).get("url", "")
        if not url.startswith(("redis://:", "rediss://:")) or "@" not in url:
            problems.append("Secret capsa-redis: url carries no password (redis://:<password>@host)")
    return problems


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dir")
    ap.add_argument("--out")
    a = ap.parse_args()
    problems = []
    docs, variants = render(a.dir, problems)
    problems += check(docs, variants)
    if a.out:
        with open(a.out, "w") as f:
            yaml.safe_dump_all(docs + [v for _, v in variants], f, sort_keys=False)
    for p in problems:
        print(f"PROBLEM {p}")
    print(f"k8s manifests: {len(docs)} resources, {len(variants)} component variants, {len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
