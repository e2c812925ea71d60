//! The deployment artefacts check out offline (deploy/check.sh; its tools come from PyPI):
//! both Kubernetes overlays render with real kustomize and pass strict validation against
//! the 1.33 schemas, a real Envoy loads every Envoy config, the gateway examples match
//! their projects' CRDs, and hadolint finds nothing in either Dockerfile.

use std::process::Command;

#[test]
fn manifests_validate_and_dockerfiles_lint_clean() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/check.sh");
    let out = Command::new("bash")
        .arg(script)
        .output()
        .expect("run deploy/check.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "deploy/check.sh failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("rendered and validated: cpu"));
    assert!(stdout.contains("rendered and validated: gpu"));
    assert!(stdout.contains("envoy --mode validate: deploy/envoy/ext-proc.yaml OK"));
    assert!(stdout.contains("envoy --mode validate: deploy/envoy/envoy.yaml OK"));
    assert!(stdout.contains("envoy --mode validate: deploy/envoy/guards-routing.yaml OK"));
    assert!(stdout.contains("deploy/gateways/istio.yaml's ext_proc filter OK"));
    for kind in [
        "EnvoyExtensionPolicy",
        "AIGatewayRoute",
        "GatewayExtension",
        "TrafficPolicy",
        "EnvoyFilter",
    ] {
        assert!(
            stdout.contains(&format!("valid: {kind} ")),
            "{kind} not validated"
        );
    }
    assert!(stdout.contains("hadolint: Dockerfile Dockerfile.cuda clean"));
}
