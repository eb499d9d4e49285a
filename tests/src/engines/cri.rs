//! Kubernetes pods through containerd's CRI plugin, created as the kubelet creates them
//! (RunPodSandbox, CreateContainer, StartContainer): the pod's labels and annotations on the
//! sandbox, the kubelet's `io.kubernetes.*` labels on the app container, a cgroup parent of the
//! pod's own (`<parent>/pod<uid>`, as the kubelet's cgroupfs driver names it), host network
//! (no CNI here). The image, also the sandbox ("pause") image, is busybox-static as an OCI
//! archive imported into namespace `k8s.io`.
//!
//! Platform notes (issue 26, ../shared/notes/platform-facts.md): runc cannot give the sandbox
//! the kubelet's oom_score_adj without CAP_SYS_RESOURCE (`restrict_oom_score_adj`); a
//! host-network pod sets no hostname; the native snapshotter.
#![expect(clippy::unwrap_used, reason = "tests panic with the reason")]

use std::{collections::HashMap, path::Path, process::Command};

use k8s_cri::v1::{
    ContainerConfig, ContainerMetadata, CreateContainerRequest, ImageSpec, LinuxContainerConfig,
    LinuxContainerSecurityContext, LinuxPodSandboxConfig, LinuxSandboxSecurityContext,
    NamespaceMode, NamespaceOption, PodSandboxConfig, PodSandboxMetadata, RemovePodSandboxRequest,
    RunPodSandboxRequest, StartContainerRequest, StopPodSandboxRequest,
    runtime_service_client::RuntimeServiceClient,
};
use keepalive_agent::CgroupPath;

use super::{Engine, IMAGE, Kind, setup::absent_in_hierarchies};

/// containerd's configuration with its CRI plugin on, under `root`.
pub(super) fn config(root: &Path) -> String {
    format!(
        "version = 2\nroot = \"{0}/root\"\nstate = \"{0}/state\"\n\
         [grpc]\naddress = \"{0}/containerd.sock\"\n\
         [ttrpc]\naddress = \"{0}/containerd.sock.ttrpc\"\n\
         [plugins.\"io.containerd.grpc.v1.cri\"]\n\
         sandbox_image = \"{IMAGE}\"\n\
         restrict_oom_score_adj = true\n\
         [plugins.\"io.containerd.grpc.v1.cri\".containerd]\n\
         snapshotter = \"native\"\n\
         [plugins.\"io.containerd.grpc.v1.cri\".cni]\n\
         bin_dir = \"{0}/cni/bin\"\nconf_dir = \"{0}/cni/conf\"\n",
        root.display()
    )
}

/// A pod the CRI runs: its sandbox, and one app container.
#[derive(Debug, Clone)]
pub struct TestPod {
    pub name: String,
    pub sandbox: String,
    /// The pod's cgroup (the sandbox's and the app container's parent).
    pub cgroup: CgroupPath,
}

impl Engine {
    /// containerd with its CRI plugin, the image imported for it.
    pub fn containerd_cri() -> Self {
        let engine = Self::containerd_with(config);
        engine.import_oci();
        engine
    }

    /// A pod named `name` in namespace `default` under cgroup `parent`, with `labels` and
    /// `annotations` on its sandbox, running `script` in its app container `app`.
    pub fn run_pod(
        &mut self,
        name: &str,
        parent: &CgroupPath,
        labels: &[(&str, &str)],
        annotations: &[(&str, &str)],
        script: &str,
    ) -> TestPod {
        assert_eq!(self.kind, Kind::Containerd, "pods need containerd's CRI");
        if let Some(top) = parent.as_str().split('/').find(|part| !part.is_empty()) {
            let new = absent_in_hierarchies(&[top]);
            self.new_parents.extend(new);
        }
        let uid = unique_uid();
        let logs = self.root.join("logs").join(&uid);
        std::fs::create_dir_all(&logs).unwrap();
        let pairs = |pairs: &[(&str, &str)]| -> HashMap<String, String> {
            pairs
                .iter()
                .map(|(key, value)| ((*key).to_string(), (*value).to_string()))
                .collect()
        };
        let mut sandbox_labels = pairs(labels);
        sandbox_labels.extend(pairs(&[
            ("io.kubernetes.pod.name", name),
            ("io.kubernetes.pod.namespace", "default"),
            ("io.kubernetes.pod.uid", &uid),
        ]));
        let host_network = || NamespaceOption {
            network: NamespaceMode::Node.into(),
            pid: NamespaceMode::Container.into(),
            ipc: NamespaceMode::Pod.into(),
            ..NamespaceOption::default()
        };
        let sandbox_config = PodSandboxConfig {
            metadata: Some(PodSandboxMetadata {
                name: name.to_string(),
                uid: uid.clone(),
                namespace: "default".into(),
                attempt: 0,
            }),
            log_directory: logs.display().to_string(),
            labels: sandbox_labels,
            annotations: pairs(annotations),
            linux: Some(LinuxPodSandboxConfig {
                cgroup_parent: format!("{parent}/pod{uid}"),
                security_context: Some(LinuxSandboxSecurityContext {
                    namespace_options: Some(host_network()),
                    ..LinuxSandboxSecurityContext::default()
                }),
                ..LinuxPodSandboxConfig::default()
            }),
            ..PodSandboxConfig::default()
        };
        let container_config = ContainerConfig {
            metadata: Some(ContainerMetadata {
                name: "app".into(),
                attempt: 0,
            }),
            image: Some(ImageSpec {
                image: IMAGE.into(),
                ..ImageSpec::default()
            }),
            command: ["sh", "-c", script].map(String::from).to_vec(),
            envs: Vec::new(),
            labels: pairs(&[
                ("io.kubernetes.container.name", "app"),
                ("io.kubernetes.pod.name", name),
                ("io.kubernetes.pod.namespace", "default"),
                ("io.kubernetes.pod.uid", &uid),
            ]),
            log_path: "app.log".into(),
            linux: Some(LinuxContainerConfig {
                security_context: Some(LinuxContainerSecurityContext {
                    namespace_options: Some(host_network()),
                    ..LinuxContainerSecurityContext::default()
                }),
                ..LinuxContainerConfig::default()
            }),
            ..ContainerConfig::default()
        };
        let socket = self.socket();
        let sandbox = runtime().block_on(async move {
            let mut client = client(&socket).await;
            let sandbox = client
                .run_pod_sandbox(RunPodSandboxRequest {
                    config: Some(sandbox_config.clone()),
                    runtime_handler: String::new(),
                })
                .await
                .unwrap_or_else(|e| panic!("RunPodSandbox: {e}"))
                .into_inner()
                .pod_sandbox_id;
            let container = client
                .create_container(CreateContainerRequest {
                    pod_sandbox_id: sandbox.clone(),
                    config: Some(container_config),
                    sandbox_config: Some(sandbox_config),
                })
                .await
                .unwrap_or_else(|e| panic!("CreateContainer: {e}"))
                .into_inner()
                .container_id;
            client
                .start_container(StartContainerRequest {
                    container_id: container,
                })
                .await
                .unwrap_or_else(|e| panic!("StartContainer: {e}"));
            sandbox
        });
        self.pods.push(sandbox.clone());
        TestPod {
            name: name.to_string(),
            sandbox,
            cgroup: CgroupPath::parse(&format!("{parent}/pod{uid}")).unwrap(),
        }
    }

    /// Stops and removes a pod with its containers.
    pub fn remove_pod(&mut self, pod: &TestPod) {
        self.remove_pod_quietly(&pod.sandbox);
        self.pods.retain(|known| known != &pod.sandbox);
    }

    pub(super) fn remove_pod_quietly(&self, sandbox: &str) {
        let socket = self.socket();
        let sandbox = sandbox.to_string();
        runtime().block_on(async move {
            let mut client = client(&socket).await;
            let _ignored = client
                .stop_pod_sandbox(StopPodSandboxRequest {
                    pod_sandbox_id: sandbox.clone(),
                })
                .await;
            let _ignored = client
                .remove_pod_sandbox(RemovePodSandboxRequest {
                    pod_sandbox_id: sandbox,
                })
                .await;
        });
    }

    /// Imports the busybox rootfs as an OCI archive (one layer; its command sleeps, so it also
    /// serves as the sandbox image) into namespace `k8s.io`, unpacked for the native
    /// snapshotter.
    fn import_oci(&self) {
        let rootfs = self.root.join("rootfs");
        let oci = self.root.join("oci");
        let blobs = oci.join("blobs/sha256");
        std::fs::create_dir_all(&blobs).unwrap();
        let layer = self.root.join("layer.tar");
        run(Command::new("tar")
            .arg("-C")
            .arg(&rootfs)
            .arg("-cf")
            .arg(&layer)
            .arg("."));
        let add = |bytes: &[u8]| -> (String, usize) {
            let path = self.root.join("blob");
            std::fs::write(&path, bytes).unwrap();
            let digest = sha256(&path);
            std::fs::rename(&path, blobs.join(&digest)).unwrap();
            (format!("sha256:{digest}"), bytes.len())
        };
        let (layer_digest, layer_size) = add(&std::fs::read(&layer).unwrap());
        let arch = match std::env::consts::ARCH {
            "aarch64" => "arm64",
            _ => "amd64",
        };
        let image_config = serde_json::json!({
            "architecture": arch,
            "os": "linux",
            "config": {"Cmd": ["sleep", "1000000"], "Env": ["PATH=/bin"]},
            "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
        });
        let (config_digest, config_size) = add(image_config.to_string().as_bytes());
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": config_digest, "size": config_size},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                        "digest": layer_digest, "size": layer_size}],
        });
        let (manifest_digest, manifest_size) = add(manifest.to_string().as_bytes());
        let index = serde_json::json!({
            "schemaVersion": 2,
            "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                           "digest": manifest_digest, "size": manifest_size,
                           "platform": {"architecture": arch, "os": "linux"},
                           "annotations": {"io.containerd.image.name": IMAGE}}],
        });
        std::fs::write(oci.join("index.json"), index.to_string()).unwrap();
        std::fs::write(oci.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
        let archive = self.root.join("busybox.oci.tar");
        run(Command::new("tar")
            .arg("-C")
            .arg(&oci)
            .arg("-cf")
            .arg(&archive)
            .arg("."));
        self.run_cli(&[
            "images",
            "import",
            "--snapshotter",
            "native",
            &archive.display().to_string(),
        ]);
    }
}

fn run(command: &mut Command) {
    let status = command.status().unwrap();
    assert!(status.success(), "{command:?}: {status}");
}

fn sha256(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    assert!(out.status.success(), "sha256sum {}", path.display());
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

async fn client(
    socket: &Path,
) -> RuntimeServiceClient<containerd_client::tonic::transport::Channel> {
    let channel = containerd_client::connect(socket)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to {}: {e}", socket.display()));
    RuntimeServiceClient::new(channel)
}

/// A pod uid in the kubelet's form (a UUID), unique on this machine for this run.
fn unique_uid() -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.subsec_nanos());
    format!(
        "{:08x}-{:04x}-4000-8000-{nanos:012x}",
        std::process::id(),
        n & 0xffff
    )
}
