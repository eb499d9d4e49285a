//! The containers an engine runs for a test: started with labels, their init process and
//! cgroup found, removed.

use std::process::Stdio;

use keepalive_agent::CgroupPath;

use super::{Engine, IMAGE, Kind, START, TestContainer, setup::absent_in_hierarchies};
use crate::wait_for;

impl Engine {
    /// Starts a container `name` with `labels` running `script` (sh -c), in the engine's
    /// usual cgroup (or under `cgroup_parent`); returns once its init process runs.
    pub fn run(
        &mut self,
        name: &str,
        labels: &[(&str, &str)],
        cgroup_parent: Option<&str>,
        script: &str,
    ) -> TestContainer {
        let labels: Vec<String> = labels
            .iter()
            .map(|(key, value)| format!("{key}={value}"))
            .collect();
        if let Some(top) =
            cgroup_parent.and_then(|parent| parent.split('/').find(|c| !c.is_empty()))
        {
            let new = absent_in_hierarchies(&[top]);
            self.new_parents.extend(new);
        }
        let mut args: Vec<String> = Vec::new();
        let id = match self.kind {
            Kind::Docker | Kind::Podman => {
                args.extend(["run", "-d", "--network", "none", "--name", name].map(String::from));
                for label in &labels {
                    args.extend(["--label".into(), label.clone()]);
                }
                if let Some(parent) = cgroup_parent {
                    args.push(format!("--cgroup-parent={parent}"));
                }
                args.extend([IMAGE, "sh", "-c", script].map(String::from));
                let refs: Vec<&str> = args.iter().map(String::as_str).collect();
                self.run_cli(&refs)
            }
            Kind::Containerd => {
                let rootfs = self.root.join("rootfs").display().to_string();
                // `--rootfs`: the first argument is a root directory, not an image.
                args.extend(["run", "-d", "--rootfs", "--env", "PATH=/bin"].map(String::from));
                for label in &labels {
                    args.extend(["--label".into(), label.clone()]);
                }
                if let Some(parent) = cgroup_parent {
                    args.push(format!("--cgroup={parent}/{name}"));
                }
                args.extend([rootfs.as_str(), name, "sh", "-c", script].map(String::from));
                let refs: Vec<&str> = args.iter().map(String::as_str).collect();
                self.run_cli(&refs);
                name.to_string()
            }
        };
        self.containers.push(id.clone());
        let pid = self.pid(&id);
        let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
            .ok()
            .and_then(|text| {
                text.lines()
                    .find_map(|line| line.strip_prefix("0::").map(str::to_string))
            })
            .and_then(|path| CgroupPath::parse(path.trim()).ok())
            .unwrap_or_else(|| panic!("no cgroup v2 path for container {name} (pid {pid})"));
        TestContainer { id, pid, cgroup }
    }

    /// The pid of a container's init process.
    fn pid(&self, id: &str) -> u32 {
        wait_for(&format!("the init pid of container {id}"), START, || {
            let text = match self.kind {
                Kind::Docker | Kind::Podman => {
                    self.run_cli(&["inspect", "--format", "{{.State.Pid}}", id])
                }
                Kind::Containerd => self
                    .run_cli(&["tasks", "ls"])
                    .lines()
                    .find_map(|line| {
                        let fields: Vec<&str> = line.split_whitespace().collect();
                        (fields.first() == Some(&id)).then(|| fields.get(1).copied())?
                    })
                    .unwrap_or("0")
                    .to_string(),
            };
            text.trim().parse::<u32>().ok().filter(|pid| *pid > 0)
        })
    }

    /// `run ARGS` with the client (Docker, podman): a container removed on drop; its id.
    pub fn run_raw(&mut self, args: &[&str]) -> String {
        let mut all = vec!["run"];
        all.extend_from_slice(args);
        let id = self.run_cli(&all);
        self.containers.push(id.clone());
        id
    }

    /// Stops and removes a container.
    pub fn remove(&mut self, id: &str) {
        self.remove_quietly(id);
        self.containers.retain(|known| known != id);
    }

    pub(super) fn remove_quietly(&self, id: &str) {
        let commands: Vec<Vec<&str>> = match self.kind {
            Kind::Docker | Kind::Podman => vec![vec!["rm", "--force", id]],
            Kind::Containerd => vec![
                vec!["tasks", "kill", "--signal", "SIGKILL", id],
                vec!["tasks", "delete", "--force", id],
                vec!["containers", "delete", id],
            ],
        };
        for args in commands {
            let _ignored = self
                .cli(&args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}
