//! The Helm chart (deploy/helm/keepalive-agent), rendered and linted by Helm's own engine (the
//! pinned helm-python-sdk) and validated offline like the kustomize base: with the default
//! values it renders the base's workload, and each value lands where it says.

use keepalive_tests::{
    manifests,
    repo::{assert_agent_accepts, read, root as repo},
};
use serde_json::{Value, json};

fn chart() -> std::path::PathBuf {
    repo().join("deploy/helm/keepalive-agent")
}

/// The chart rendered with `values`, parsed; and the rendered YAML.
fn render(values: &Value) -> (String, Vec<Value>) {
    let yaml = manifests::helm_render(&chart(), values);
    let documents = manifests::parse(&yaml);
    (yaml, documents)
}

fn container(documents: &[Value]) -> &Value {
    &manifests::find(documents, "DaemonSet", Some("keepalive-agent"))["spec"]["template"]["spec"]["containers"]
        [0]
}

/// The agent's arguments with `$(HOST_IP)` as the kubelet expands it.
fn expanded(args: &[String]) -> Vec<String> {
    args.iter()
        .map(|arg| arg.replace("$(HOST_IP)", "192.0.2.10"))
        .collect()
}

fn args(documents: &[Value]) -> Vec<String> {
    container(documents)["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|arg| arg.as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn the_chart_lints_and_its_defaults_render_the_kustomize_base_workload() {
    let lint = manifests::helm_lint(&chart());
    assert_eq!(lint["errors"], json!([]), "{lint}");
    let (yaml, documents) = render(&json!({}));
    manifests::validate(&yaml, documents.len());
    let kinds: Vec<&str> = documents
        .iter()
        .map(|doc| doc["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["ConfigMap", "DaemonSet", "Service"]);
    let base = manifests::parse(&manifests::render(&repo().join("deploy/kubernetes")));
    for (kind, name) in [
        ("DaemonSet", "keepalive-agent"),
        ("Service", "keepalive-agent-metrics"),
        ("ConfigMap", "keepalive-agent-policy"),
    ] {
        let helm = manifests::find(&documents, kind, Some(name));
        let kustomize = manifests::find(&base, kind, Some(name));
        assert_eq!(helm["metadata"]["namespace"], "keepalive-agent");
        // The pod's own labels carry the release too; everything else is the same.
        let compared = |doc: &Value| match kind {
            "DaemonSet" => json!([doc["spec"]["template"]["spec"], doc["spec"]["selector"]]),
            "Service" => doc["spec"].clone(),
            _ => doc["data"].clone(),
        };
        assert_eq!(
            compared(helm),
            compared(kustomize),
            "{kind} {name}: the chart's defaults and the kustomize base differ"
        );
    }
    assert_agent_accepts(&expanded(&args(&documents)), "the chart's DaemonSet");
}

#[test]
fn each_value_lands_where_it_says() {
    let digest = format!("sha256:{}", "ab".repeat(32));
    let (yaml, documents) = render(&json!({
        "image": {"repository": "registry.example.com/keepalive-agent", "tag": "9.9.9",
                  "digest": digest, "pullPolicy": "Always"},
        "policy": {"existingConfigMap": "fleet-policy"},
        "metrics": {"port": 9555},
        "serviceMonitor": {"enabled": true, "interval": "15s", "labels": {"release": "kps"}},
        "prometheusRule": {"enabled": true},
        "dashboard": {"enabled": true},
        "resources": {"limits": {"memory": "96Mi"}},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "db"}],
        "nodeSelector": {"kubernetes.io/os": "linux"},
        "priorityClassName": "",
        "crio": {"enabled": true},
        "extraArgs": ["--missing-interval=30"],
    }));
    // The ServiceMonitor and the PrometheusRule are CRDs the validator does not know.
    let known = documents
        .iter()
        .filter(|doc| doc["apiVersion"] != "monitoring.coreos.com/v1")
        .count();
    let plain: Vec<&str> = yaml
        .split("---\n")
        .filter(|doc| !doc.contains("monitoring.coreos.com/v1"))
        .collect();
    manifests::validate(&plain.join("---\n"), known);

    let container = container(&documents);
    assert_eq!(
        container["image"],
        format!("registry.example.com/keepalive-agent@{digest}")
    );
    assert_eq!(container["imagePullPolicy"], "Always");
    // Helm merges values: the limit given, the default requests kept.
    assert_eq!(
        container["resources"],
        json!({"limits": {"memory": "96Mi"}, "requests": {"cpu": "10m", "memory": "16Mi"}})
    );
    assert_eq!(container["ports"][0]["hostPort"], 9555);
    let args = args(&documents);
    assert!(
        args.contains(&"--metrics-addr=$(HOST_IP):9555".to_owned()),
        "{args:?}"
    );
    assert_eq!(
        args.last().map(String::as_str),
        Some("--missing-interval=30")
    );
    assert_agent_accepts(&expanded(&args), "the chart's DaemonSet with extraArgs");

    let pod = &manifests::find(&documents, "DaemonSet", Some("keepalive-agent"))["spec"]["template"]
        ["spec"];
    assert_eq!(pod["volumes"][0]["configMap"]["name"], "fleet-policy");
    assert_eq!(pod["nodeSelector"], json!({"kubernetes.io/os": "linux"}));
    assert_eq!(pod["tolerations"][0]["key"], "dedicated");
    assert!(
        args.contains(&"--crio-socket=/run/crio/crio.sock".to_owned())
            && container["volumeMounts"]
                .as_array()
                .unwrap()
                .iter()
                .any(|mount| mount["mountPath"] == "/run/crio" && mount["readOnly"] == true)
            && pod["volumes"]
                .as_array()
                .unwrap()
                .iter()
                .any(|volume| volume["hostPath"]["path"] == "/run/crio"),
        "crio.enabled: {pod}"
    );
    assert!(pod.get("priorityClassName").is_none(), "{pod}");
    assert!(
        !documents
            .iter()
            .any(|doc| doc["metadata"]["name"] == "keepalive-agent-policy"),
        "with existingConfigMap the chart makes no ConfigMap of its own"
    );
    let service = manifests::find(&documents, "Service", Some("keepalive-agent-metrics"));
    assert_eq!(service["spec"]["ports"][0]["port"], 9555);

    let monitor = manifests::find(&documents, "ServiceMonitor", Some("keepalive-agent"));
    assert_eq!(monitor["spec"]["endpoints"][0]["interval"], "15s");
    assert_eq!(monitor["metadata"]["labels"]["release"], "kps");
    let rule = manifests::find(&documents, "PrometheusRule", Some("keepalive-agent"));
    assert_eq!(
        rule["spec"],
        manifests::parse(&read("deploy/prometheus/keepalive-agent.rules.yml"))[0]
    );
    let dashboard = manifests::find(&documents, "ConfigMap", Some("keepalive-agent-dashboard"));
    assert_eq!(dashboard["metadata"]["labels"]["grafana_dashboard"], "1");
    let shipped: Value =
        serde_json::from_str(dashboard["data"]["keepalive-agent.json"].as_str().unwrap()).unwrap();
    let file: Value = serde_json::from_str(&read("deploy/grafana/keepalive-agent.json")).unwrap();
    assert_eq!(shipped, file);
}

#[test]
fn an_inline_policy_is_the_configmap_the_agents_read() {
    let policy = "[default]\nidle = 45\n";
    let (_, documents) = render(&json!({"policy": {"toml": policy}}));
    let config = manifests::find(&documents, "ConfigMap", Some("keepalive-agent-policy"));
    assert_eq!(config["data"]["policy.toml"], policy);
    let pod = &manifests::find(&documents, "DaemonSet", Some("keepalive-agent"))["spec"]["template"]
        ["spec"];
    assert_eq!(
        pod["volumes"][0]["configMap"]["name"],
        "keepalive-agent-policy"
    );
    assert_eq!(
        container(&documents)["image"],
        format!("localhost/keepalive-agent:{}", env!("CARGO_PKG_VERSION"))
    );
}
