//! The Kubernetes manifests (deploy/k8s) as an operator would apply them: rendered like
//! `kubectl kustomize` (deploy/k8s/check.py, with the Secret from deploy/k8s/secrets.sh),
//! validated against the API schemas of Kubernetes 1.30 and 1.37 with `kubernetes-validate
//! --strict` (pinned in clients/python/requirements-test.txt), and held to the structural
//! rules check.py enforces (limits, probes, PDBs, ServiceAccounts, NetworkPolicies, ...).
//! Each rule is also shown to fail on a copy with that defect.
//!
//! Needs `CAPSA_PYTHON` (deploy/scripts/python-env.sh; the test command sets it).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use capsa_e2e::test_python;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn text(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// A copy of deploy/k8s and deploy/observability (the Collector config it loads), with its
/// own secrets (redis.env, tls/) written by secrets.sh; never the working tree's own.
struct Copy {
    _dir: tempfile::TempDir,
    k8s: PathBuf,
}

impl Copy {
    fn new() -> Copy {
        let dir = tempfile::tempdir().unwrap();
        let k8s = dir.path().join("deploy/k8s");
        copy_dir(&repo().join("deploy/k8s"), &k8s);
        copy_dir(
            &repo().join("deploy/observability"),
            &dir.path().join("deploy/observability"),
        );
        // secrets.sh makes the internal plane's certificates with it.
        std::fs::create_dir_all(dir.path().join("deploy/scripts")).unwrap();
        std::fs::copy(
            repo().join("deploy/scripts/certs.sh"),
            dir.path().join("deploy/scripts/certs.sh"),
        )
        .unwrap();
        let _ = std::fs::remove_dir_all(k8s.join("secrets/tls"));
        let _ = std::fs::remove_file(k8s.join("secrets/redis.env"));
        let out = Command::new("bash")
            .arg(k8s.join("secrets.sh"))
            .output()
            .unwrap();
        assert!(out.status.success(), "secrets.sh: {}", text(&out));
        let env = std::fs::read_to_string(k8s.join("secrets/redis.env")).unwrap();
        assert!(
            env.lines().any(|l| l.starts_with("url=redis://:")) && env.contains("password="),
            "secrets.sh wrote no password and URL"
        );
        Copy { _dir: dir, k8s }
    }

    /// Replaces `from` (which must occur) with `to` in `file`.
    fn edit(&self, file: &str, from: &str, to: &str) {
        let path = self.k8s.join(file);
        let s = std::fs::read_to_string(&path).unwrap();
        assert!(s.contains(from), "{file} no longer contains {from:?}");
        std::fs::write(&path, s.replacen(from, to, 1)).unwrap();
    }

    fn check(&self, out: Option<&Path>) -> Output {
        let mut cmd = Command::new(test_python());
        cmd.arg(repo().join("deploy/k8s/check.py")).arg(&self.k8s);
        if let Some(out) = out {
            cmd.arg("--out").arg(out);
        }
        cmd.output().unwrap()
    }
}

#[test]
fn manifests_render_validate_against_the_schemas_and_pass_the_checks() {
    let copy = Copy::new();
    let rendered = copy.k8s.join("rendered.yaml");
    let out = copy.check(Some(&rendered));
    assert!(out.status.success(), "check.py: {}", text(&out));
    let summary = String::from_utf8_lossy(&out.stdout).to_string();
    eprintln!("{summary}");
    let resources = std::fs::read_to_string(&rendered)
        .unwrap()
        .lines()
        .filter(|l| l.starts_with("kind:"))
        .count();
    assert!(resources >= 30, "{resources} resources rendered: {summary}");

    let out = Command::new(test_python())
        .args(["-m", "kubernetes_validate", "--strict"])
        .args(["-k", "1.30.0", "-k", "1.37.0"])
        .arg(&rendered)
        .output()
        .unwrap();
    assert!(out.status.success(), "kubernetes_validate: {}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let passed = stdout.lines().filter(|l| l.contains(" passed ")).count();
    // Every resource, against both versions.
    assert_eq!(passed, 2 * resources, "{}", text(&out));
}

#[test]
fn the_schema_validation_rejects_an_unknown_field() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        "apiVersion: v1\nkind: ServiceAccount\nmetadata: { name: x }\nautomountServiceAccountTokn: false\n",
    )
    .unwrap();
    let out = Command::new(test_python())
        .args(["-m", "kubernetes_validate", "--strict", "-k", "1.30.0"])
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("automountServiceAccountTokn"),
        "{}",
        text(&out)
    );
}

#[test]
fn each_structural_rule_fails_on_a_copy_with_that_defect() {
    // (file, text, replacement, what check.py must say)
    let defects: &[(&str, &str, &str, &str)] = &[
        (
            "node.yaml",
            "          command: [capsa-vm-pool]\n",
            "",
            "container vm-pool: args without command",
        ),
        (
            "session-manager.yaml",
            "limits: { cpu: \"1\", memory: 512Mi }",
            "limits: { cpu: \"1\" }",
            "container session-manager: no resources.limits.memory",
        ),
        (
            "metering.yaml",
            "          livenessProbe: { grpc: { port: 50064 }, periodSeconds: 20, timeoutSeconds: 5 }\n",
            "",
            "container metering: no livenessProbe",
        ),
        (
            "node.yaml",
            "readinessProbe: { grpc: { port: 50063 }, periodSeconds: 10 }",
            "readinessProbe: { tcpSocket: { port: 50063 }, periodSeconds: 10 }",
            "readinessProbe is not a grpc.health.v1 probe on 50063",
        ),
        // A probe on the mTLS port: the kubelet has no client certificate.
        (
            "session-manager.yaml",
            "livenessProbe: { grpc: { port: 50061 }",
            "livenessProbe: { grpc: { port: 50051 }",
            "container session-manager: livenessProbe is not a grpc.health.v1 probe on 50061",
        ),
        (
            "metering.yaml",
            "args: [--listen=0.0.0.0:50054, --health-listen=0.0.0.0:50064]",
            "args: [--listen=0.0.0.0:50054]",
            "container metering: mTLS on its gRPC port and no --health-listen",
        ),
        (
            "node.yaml",
            "            - { name: CAPSA_TLS_CA, value: /etc/capsa/tls/ca.crt }\n",
            "",
            "container vm-pool: no mTLS (CAPSA_TLS_CA unset)",
        ),
        (
            "node.yaml",
            "--executor-url=https://",
            "--executor-url=http://",
            "container vm-pool: --executor-url http://$(POD_IP):50053 is plaintext under mTLS",
        ),
        (
            "session-manager.yaml",
            "secretName: capsa-tls-session-manager",
            "secretName: capsa-tls-gateway",
            "mounts Secret capsa-tls-gateway, which is not defined",
        ),
        (
            "metering.yaml",
            "runAsGroup: 10001, fsGroup: 10001 }",
            "runAsGroup: 10001 }",
            "container metering: Secret capsa-tls-metering (mode 0440) is unreadable by uid 10001",
        ),
        (
            "serviceaccounts.yaml",
            "metadata: { name: gateway }\nautomountServiceAccountToken: false",
            "metadata: { name: gateway }\nautomountServiceAccountToken: true",
            "ServiceAccount gateway: automountServiceAccountToken is not false",
        ),
        (
            "networkpolicies.yaml",
            "        - podSelector: { matchLabels: { app: metering } }\n      ports:\n        - { protocol: TCP, port: 50052 }",
            "        - podSelector: { matchLabels: { app: gateway } }\n      ports:\n        - { protocol: TCP, port: 50052 }",
            "lets {'podSelector': {'matchLabels': {'app': 'gateway'}}} reach the node pods",
        ),
        (
            "networkpolicies.yaml",
            "  podSelector: { matchLabels: { app: capsa-node } }",
            "  podSelector: { matchLabels: { app: nothing } }",
            "none selects the node pods",
        ),
        (
            "node.yaml",
            "requests: { cpu: \"4\", memory: 7168Mi }\n            limits: { cpu: \"4\", memory: 7168Mi }",
            "requests: { cpu: \"4\", memory: 4Gi }\n            limits: { cpu: \"4\", memory: 4Gi }",
            "memory limit 4Gi does not hold the VMs' 6656 MiB",
        ),
        (
            "node.yaml",
            "limits: { cpu: 500m, memory: 256Mi }",
            "limits: { cpu: \"1\", memory: 256Mi }",
            "not Guaranteed QoS",
        ),
        (
            "metering.yaml",
            "  minAvailable: 1\n  selector: { matchLabels: { app: metering } }",
            "  minAvailable: 1\n  selector: { matchLabels: { app: other } }",
            "Deployment metering: no PodDisruptionBudget",
        ),
        (
            "gateway.yaml",
            "            - { name: OTEL_EXPORTER_OTLP_ENDPOINT, value: \"http://otel-collector:4317\" }\n",
            "",
            "container gateway: no OTEL_EXPORTER_OTLP_ENDPOINT",
        ),
        (
            "kustomization.yaml",
            "  - bootstrap-job.yaml\n",
            "",
            "bootstrap-job.yaml is not listed under resources",
        ),
        (
            "cloud-hypervisor/vm-pool.yaml",
            "            - { name: CAPSA_ENGINE, value: cloud-hypervisor }\n",
            "            - { name: CAPSA_ENGINE, value: cloud-hypervisor }\n            - { name: CAPSA_VMPOOL_CAPACITY_MEMORY_MIB, value: \"0\" }\n",
            "(component cloud-hypervisor) container vm-pool: CAPSA_VMPOOL_CAPACITY_MEMORY_MIB unset",
        ),
    ];
    for (file, from, to, expect) in defects {
        let copy = Copy::new();
        copy.edit(file, from, to);
        let out = copy.check(None);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            !out.status.success() && stdout.contains(expect),
            "{file}: expected a problem containing {expect:?}\n{}",
            text(&out)
        );
    }
    // And the Secret: without secrets.sh's file nothing renders.
    let copy = Copy::new();
    std::fs::remove_file(copy.k8s.join("secrets/redis.env")).unwrap();
    let out = copy.check(None);
    assert!(
        !out.status.success()
            && String::from_utf8_lossy(&out.stdout).contains("run deploy/k8s/secrets.sh"),
        "{}",
        text(&out)
    );
}
