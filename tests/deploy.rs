//! The deployment artefacts check out offline: both Kubernetes overlays render and pass
//! strict validation against the 1.33 schemas, and hadolint finds nothing in either
//! Dockerfile (deploy/check.sh; its tools come from PyPI).

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
    assert!(stdout.contains("hadolint: Dockerfile Dockerfile.cuda clean"));
}
