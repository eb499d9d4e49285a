//! `cargo xtask image`: the agent's own container image, from the repository alone.
//!
//! No registry is assumed reachable, so nothing is pulled: the agent is built here as a static
//! binary (the pinned host toolchain's musl target), and `deploy/Dockerfile` (`FROM scratch`)
//! only copies it and the default policy. buildah builds it daemonless, with a throwaway vfs
//! storage directory under target/ (removed again: nothing is left in the system's image
//! store, nothing is mounted), and writes a docker-archive tarball.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail, ensure};

use crate::{arch::Arch, cmd::run_status, packages, target_dir, toolchain::Toolchain};

/// The image's name; the tag is the workspace version.
pub(crate) const NAME: &str = "localhost/keepalive-agent";

/// Where the image is written, beside the static binary its context copies.
pub(crate) fn dir(workspace: &Path) -> PathBuf {
    target_dir(workspace).join("image")
}

/// `localhost/keepalive-agent:<version>`.
pub(crate) fn reference() -> String {
    format!("{NAME}:{}", env!("CARGO_PKG_VERSION"))
}

/// Builds the static agent for `arch` (what the image and the packages ship); returns its path,
/// `target/<arch>-unknown-linux-musl/release/keepalive-agent`.
pub(crate) fn build_static(
    workspace: &Path,
    toolchain: &Toolchain,
    arch: Arch,
) -> anyhow::Result<PathBuf> {
    let mut cargo = crate::cargo(workspace, toolchain)?;
    cargo.args([
        "build",
        "--locked",
        "--release",
        "--package",
        "keepalive-agent",
    ]);
    let target = arch.static_target(&mut cargo)?;
    run_status(&mut cargo)?;
    let built = target_dir(workspace)
        .join(&target)
        .join("release")
        .join("keepalive-agent");
    ensure!(
        !has_interpreter(&built)?,
        "{} is dynamically linked: the image and the packages ship it without a libc",
        built.display()
    );
    Ok(built)
}

/// The image's two archives.
#[derive(Debug)]
pub(crate) struct Archives {
    /// docker-archive of this host's architecture: `docker load -i`, `podman load -i`.
    pub(crate) host: PathBuf,
    /// oci-archive of the index of both architectures: `skopeo copy --all` to a registry, from
    /// which each node pulls its own half.
    pub(crate) index: PathBuf,
}

/// Builds the static agent of each architecture and the image; returns the archives.
pub(crate) fn build(
    workspace: &Path,
    toolchain: &Toolchain,
    source: Option<&str>,
) -> anyhow::Result<Archives> {
    packages::ensure(packages::IMAGE)?;
    let dir = dir(workspace);
    let host = Arch::host()?;
    for arch in Arch::ALL {
        let built = build_static(workspace, toolchain, arch)?;
        // The path deploy/Dockerfile copies from (and .dockerignore lets through).
        let stage = dir.join(arch.debian());
        fs::create_dir_all(&stage).with_context(|| format!("cannot create {}", stage.display()))?;
        let staged = stage.join("keepalive-agent");
        fs::copy(&built, &staged)
            .with_context(|| format!("cannot copy {} to {}", built.display(), staged.display()))?;
        if arch == host {
            run_status(Command::new(&staged).arg("--version"))?;
        }
    }

    let archives = Archives {
        host: dir.join("keepalive-agent.tar"),
        index: dir.join("keepalive-agent.oci.tar"),
    };
    let source = source.map(str::to_string).or_else(|| origin(workspace));
    Buildah::new(&dir.join("buildah"))?.build(workspace, &archives, source.as_deref())?;
    for (archive, what) in [
        (&archives.host, "`docker load -i` or `podman load -i` it"),
        (
            &archives.index,
            "amd64 and arm64: `skopeo copy --all oci-archive:...` it to a registry",
        ),
    ] {
        let size = fs::metadata(archive)
            .with_context(|| format!("{} was not written", archive.display()))?
            .len();
        eprintln!(
            "xtask: {} is {} ({:.1} MiB): {what}",
            archive.display(),
            reference(),
            mib(size),
        );
    }
    Ok(archives)
}

#[expect(
    clippy::cast_precision_loss,
    reason = "a file size, printed to one decimal"
)]
fn mib(bytes: u64) -> f64 {
    bytes as f64 / 1024.0 / 1024.0
}

/// buildah with its own storage: a vfs root and run root in `dir`, removed on drop.
#[derive(Debug)]
struct Buildah {
    dir: PathBuf,
}

impl Buildah {
    fn new(dir: &Path) -> anyhow::Result<Self> {
        if dir.exists() {
            // Left by an interrupted run.
            fs::remove_dir_all(dir).with_context(|| format!("cannot remove {}", dir.display()))?;
        }
        fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        // No system policy.json is assumed (containers-common may be absent); the image is
        // built from local files only, so there is nothing to verify.
        fs::write(
            dir.join("policy.json"),
            r#"{"default":[{"type":"insecureAcceptAnything"}]}"#,
        )?;
        Ok(Self {
            dir: dir.to_path_buf(),
        })
    }

    fn command(&self, subcommand: &[&str]) -> Command {
        let mut command = Command::new("buildah");
        command
            .arg("--root")
            .arg(self.dir.join("root"))
            .arg("--runroot")
            .arg(self.dir.join("run"))
            .args(["--storage-driver", "vfs"])
            .args(subcommand)
            .arg("--signature-policy")
            .arg(self.dir.join("policy.json"));
        command
    }

    /// One image per architecture, both in the manifest list `<reference>`; then the host's
    /// image as a docker-archive tagged `<reference>` and the list as an OCI index.
    fn build(
        &self,
        workspace: &Path,
        archives: &Archives,
        source: Option<&str>,
    ) -> anyhow::Result<()> {
        let reference = reference();
        for arch in Arch::ALL {
            let mut build = self.command(&["build"]);
            build
                .args(["--file", "deploy/Dockerfile", "--isolation", "chroot"])
                .args(["--platform", &format!("linux/{}", arch.debian())])
                .arg("--build-arg")
                .arg(format!("TARGETARCH={}", arch.debian()))
                .arg("--build-arg")
                .arg(format!("VERSION={}", env!("CARGO_PKG_VERSION")))
                .arg("--build-arg")
                .arg(format!("REVISION={}", revision(workspace)))
                .arg("--iidfile")
                .arg(self.dir.join(arch.debian()))
                .args(["--manifest", &reference]);
            if let Some(source) = source {
                build
                    .arg("--label")
                    .arg(format!("org.opencontainers.image.source={source}"));
            }
            // The same bytes for the same commit: file times and the creation date are the
            // commit's.
            if let Some(time) = git(workspace, &["log", "-1", "--format=%ct"]) {
                build.args(["--timestamp", &time]);
            }
            run_status(build.arg(".").current_dir(workspace))?;
        }
        for archive in [&archives.host, &archives.index] {
            if archive.exists() {
                fs::remove_file(archive)
                    .with_context(|| format!("cannot remove {}", archive.display()))?;
            }
        }
        let host = self.dir.join(Arch::host()?.debian());
        let host = fs::read_to_string(&host)
            .with_context(|| format!("buildah wrote no image id to {}", host.display()))?;
        run_status(self.command(&["push"]).arg(host.trim()).arg(format!(
            "docker-archive:{}:{reference}",
            archives.host.display()
        )))?;
        run_status(
            self.command(&["manifest", "push"])
                .args(["--all", "--format", "oci", &reference])
                .arg(format!(
                    "oci-archive:{}:{reference}",
                    archives.index.display()
                )),
        )
    }
}

impl Drop for Buildah {
    fn drop(&mut self) {
        let _ignored = fs::remove_dir_all(&self.dir);
    }
}

/// The commit the image is built from: `KEEPALIVE_AGENT_COMMIT` (as the agent's build script
/// reads it), else git's HEAD.
pub(crate) fn revision(workspace: &Path) -> String {
    std::env::var("KEEPALIVE_AGENT_COMMIT")
        .ok()
        .filter(|commit| !commit.is_empty())
        .or_else(|| git(workspace, &["rev-parse", "HEAD"]))
        .unwrap_or_else(|| "unknown".to_string())
}

/// The `origin` remote as an https URL without credentials, if there is one.
fn origin(workspace: &Path) -> Option<String> {
    public_url(&git(workspace, &["remote", "get-url", "origin"])?)
}

/// `url` (https, http or scp-like `git@host:owner/repo`) as `https://host/path`, without
/// user or token and without `.git`; None for anything else (a local path, file://).
fn public_url(url: &str) -> Option<String> {
    let url = match url.strip_prefix("git@") {
        Some(rest) => format!("https://{}", rest.replacen(':', "/", 1)),
        None => url.to_string(),
    };
    let (scheme, rest) = url.split_once("://")?;
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    let host = authority
        .rsplit_once('@')
        .map_or(authority, |(_, host)| host);
    let path = path.strip_suffix(".git").unwrap_or(path);
    (matches!(scheme, "https" | "http") && !host.is_empty())
        .then(|| format!("https://{host}/{path}"))
}

pub(crate) fn git(workspace: &Path, args: &[&str]) -> Option<String> {
    which::which("git").ok()?;
    let out = Command::new("git")
        .args(args)
        .current_dir(workspace)
        .output()
        .ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    (out.status.success() && !text.trim().is_empty()).then(|| text.trim().to_string())
}

/// Whether the ELF file at `path` names a program interpreter (PT_INTERP): a dynamically
/// linked executable. A static-pie has none.
fn has_interpreter(path: &Path) -> anyhow::Result<bool> {
    const PT_INTERP: u32 = 3;
    let elf = fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let field = |offset: usize, len: usize| -> anyhow::Result<u64> {
        let bytes = elf
            .get(offset..offset + len)
            .with_context(|| format!("{} is not a 64-bit ELF file", path.display()))?;
        Ok(bytes
            .iter()
            .rev()
            .fold(0, |value, byte| (value << 8) | u64::from(*byte)))
    };
    if elf.get(..6) != Some(b"\x7fELF\x02\x01".as_slice()) {
        bail!("{} is not a 64-bit little-endian ELF file", path.display());
    }
    let phoff = usize::try_from(field(0x20, 8)?)?;
    let phentsize = usize::try_from(field(0x36, 2)?)?;
    let phnum = usize::try_from(field(0x38, 2)?)?;
    for index in 0..phnum {
        if field(phoff + index * phentsize, 4)? == u64::from(PT_INTERP) {
            return Ok(true);
        }
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::public_url;

    #[test]
    fn source_urls_lose_credentials() {
        for (remote, public) in [
            (
                "https://github.com/acme/keepalive-agent.git",
                Some("https://github.com/acme/keepalive-agent"),
            ),
            (
                "https://user:ghp_secret@github.com/acme/keepalive-agent",
                Some("https://github.com/acme/keepalive-agent"),
            ),
            (
                "git@github.com:acme/keepalive-agent.git",
                Some("https://github.com/acme/keepalive-agent"),
            ),
            (
                "http://token@git.example.com/a/b@c",
                Some("https://git.example.com/a/b@c"),
            ),
            ("/srv/git/keepalive-agent.git", None),
            ("file:///srv/git/keepalive-agent.git", None),
        ] {
            assert_eq!(public_url(remote).as_deref(), public, "{remote}");
        }
    }
}
