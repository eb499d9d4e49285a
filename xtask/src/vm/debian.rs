//! Debian's kernel packages: resolved from a suite's `linux-image-amd64`, downloaded with
//! `apt-get download` (never installed into the host), extracted and indexed with depmod into
//! the cache. apt runs against a private sources list and package lists, so the host's apt
//! configuration and state are left as they were.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail, ensure};

use crate::cmd::run_status;

/// A kernel of the matrix: the name users pass to `--kernel` and the Debian suite it comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Kernel {
    pub(crate) name: &'static str,
    suite: &'static str,
}

/// Amazon Linux 2 (5.10), Debian 12 / AL2023 / COS (6.1), the newer LTS (6.12).
pub(crate) const MATRIX: &[Kernel] = &[
    Kernel {
        name: "5.10",
        suite: "bullseye",
    },
    Kernel {
        name: "6.1",
        suite: "bookworm",
    },
    Kernel {
        name: "6.12",
        suite: "bookworm-backports",
    },
];

/// A kernel unpacked in the cache.
#[derive(Debug, Clone)]
pub(crate) struct Unpacked {
    /// `uname -r` of the kernel.
    pub(crate) release: String,
    /// The Debian package version it came from.
    pub(crate) version: String,
    pub(crate) vmlinuz: PathBuf,
    /// `lib/modules/<release>`, with depmod's indexes.
    pub(crate) modules: PathBuf,
}

/// Resolves the suite's current kernel, and downloads and unpacks it unless the cache has it.
pub(crate) fn fetch(kernel: Kernel, cache: &Path) -> anyhow::Result<Unpacked> {
    let apt = Apt::new(kernel.suite, &cache.join("apt").join(kernel.suite))?;
    let package = apt.image_package()?;
    let dir = cache.join(&package);
    let done = dir.join("unpacked");
    if !done.exists() {
        let _ignored = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        eprintln!("xtask: downloading {package} from Debian {}", kernel.suite);
        apt.download(&package, &dir)?;
        unpack(&dir)?;
        fs::write(&done, "").context("cannot mark the kernel unpacked")?;
    }
    let release = package
        .strip_prefix("linux-image-")
        .context("not a linux-image package")?
        .to_owned();
    let version = fs::read_to_string(dir.join("version")).unwrap_or_default();
    Ok(Unpacked {
        vmlinuz: dir.join("root/boot").join(format!("vmlinuz-{release}")),
        modules: dir.join("root/lib/modules").join(&release),
        version: version.trim().to_owned(),
        release,
    })
}

/// The packages of bookworm-backports' systemd that the systemd-backports guest unpacks over
/// its root (the host root's systemd is Debian 12's 252; 253 brought Type=notify-reload).
const SYSTEMD_PACKAGES: &[&str] = &[
    "systemd",
    "libsystemd-shared",
    "libsystemd0",
    "udev",
    "libudev1",
];
const SYSTEMD_SUITE: &str = "bookworm-backports";

/// bookworm-backports' systemd unpacked into the cache (once per version): its `root/`.
pub(crate) fn fetch_systemd(cache: &Path) -> anyhow::Result<PathBuf> {
    let apt = Apt::new(SYSTEMD_SUITE, &cache.join("apt").join(SYSTEMD_SUITE))?;
    let version = apt.candidate("systemd")?;
    let dir = cache.join(format!("systemd-{version}"));
    let root = dir.join("root");
    let done = dir.join("unpacked");
    if !done.exists() {
        let _ignored = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        eprintln!("xtask: downloading systemd {version} from Debian {SYSTEMD_SUITE}");
        for package in SYSTEMD_PACKAGES {
            apt.download(package, &dir)?;
        }
        for entry in fs::read_dir(&dir)?.flatten() {
            let deb = entry.path();
            if deb.extension().is_some_and(|ext| ext == "deb") {
                run_status(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root))?;
                fs::remove_file(&deb).context("cannot remove the downloaded package")?;
            }
        }
        fs::write(&done, "").context("cannot mark systemd unpacked")?;
    }
    Ok(root)
}

/// `dpkg-deb -x` of the downloaded package into `root/`, then depmod for module autoloading.
fn unpack(dir: &Path) -> anyhow::Result<()> {
    let deb = fs::read_dir(dir)?
        .flatten()
        .map(|entry| entry.path())
        .find(|path| path.extension().is_some_and(|ext| ext == "deb"))
        .context("apt-get download left no .deb")?;
    let version = Command::new("dpkg-deb")
        .args(["--field"])
        .arg(&deb)
        .arg("Version")
        .output()
        .context("dpkg-deb --field")?;
    fs::write(dir.join("version"), &version.stdout)?;
    let root = dir.join("root");
    run_status(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root))?;
    let modules = root.join("lib/modules");
    let release = fs::read_dir(&modules)
        .with_context(|| format!("the package has no {}", modules.display()))?
        .flatten()
        .find_map(|entry| entry.file_name().into_string().ok())
        .context("the package has no kernel modules")?;
    run_status(Command::new("depmod").arg("-b").arg(&root).arg(&release))?;
    fs::remove_file(&deb).context("cannot remove the downloaded package")
}

/// apt with a sources list of one suite and package lists of its own.
#[derive(Debug)]
struct Apt {
    options: Vec<String>,
}

impl Apt {
    fn new(suite: &str, state: &Path) -> anyhow::Result<Self> {
        let lists = state.join("lists");
        let archives = state.join("cache/archives");
        let empty = state.join("empty");
        for dir in [&lists.join("partial"), &archives.join("partial"), &empty] {
            fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        }
        let sources = state.join("sources.list");
        fs::write(
            &sources,
            format!(
                "deb [signed-by={KEYRING}] {} {suite} main\n",
                host_mirror()?
            ),
        )?;
        let option = |key: &str, value: &Path| format!("{key}={}", value.display());
        let options = vec![
            option("Dir::Etc::SourceList", &sources),
            option("Dir::Etc::SourceParts", &empty),
            option("Dir::Etc::Preferences", Path::new("/dev/null")),
            option("Dir::Etc::PreferencesParts", &empty),
            option("Dir::State::Lists", &lists),
            option("Dir::Cache", &state.join("cache")),
            "APT::Sandbox::User=root".to_owned(),
        ];
        let apt = Self { options };
        run_status(apt.command("apt-get").args(["update", "-qq"]))
            .with_context(|| format!("cannot read Debian {suite}'s package lists"))?;
        Ok(apt)
    }

    fn command(&self, program: &str) -> Command {
        let mut command = Command::new(program);
        for option in &self.options {
            command.args(["-o", option]);
        }
        command
    }

    /// The `linux-image-<release>` that the suite's `linux-image-amd64` depends on.
    fn image_package(&self) -> anyhow::Result<String> {
        let out = self
            .command("apt-cache")
            .args(["depends", "linux-image-amd64"])
            .output()
            .context("apt-cache depends")?;
        ensure!(
            out.status.success(),
            "apt-cache depends linux-image-amd64 failed"
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find_map(|line| {
                let package = line.trim().strip_prefix("Depends: ")?;
                package
                    .starts_with("linux-image-")
                    .then(|| package.to_owned())
            })
            .context("linux-image-amd64 depends on no linux-image package")
    }

    /// The version apt would install of `package` from this suite.
    fn candidate(&self, package: &str) -> anyhow::Result<String> {
        let out = self
            .command("apt-cache")
            .args(["policy", package])
            .output()
            .context("apt-cache policy")?;
        ensure!(out.status.success(), "apt-cache policy {package} failed");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find_map(|line| line.trim().strip_prefix("Candidate: "))
            .filter(|version| *version != "(none)")
            .map(str::to_owned)
            .with_context(|| format!("no {package} in this suite"))
    }

    fn download(&self, package: &str, into: &Path) -> anyhow::Result<()> {
        run_status(
            self.command("apt-get")
                .args(["download", "-qq", package])
                .current_dir(into),
        )
    }
}

/// Debian's archive key ring, which signs bullseye, bookworm and bookworm-backports.
const KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";

/// The Debian mirror the host's apt uses (the first non-security `URIs:` or `deb` line).
fn host_mirror() -> anyhow::Result<String> {
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(entries) = fs::read_dir("/etc/apt/sources.list.d") {
        let mut parts: Vec<PathBuf> = entries.flatten().map(|entry| entry.path()).collect();
        parts.sort();
        files.extend(parts);
    }
    for file in files {
        let Ok(text) = fs::read_to_string(&file) else {
            continue;
        };
        for line in text.lines().map(str::trim) {
            let uri = if let Some(rest) = line.strip_prefix("URIs:") {
                rest.split_whitespace().next()
            } else if let Some(rest) = line.strip_prefix("deb ") {
                rest.split_whitespace().find(|word| word.contains("://"))
            } else {
                None
            };
            if let Some(uri) = uri.filter(|uri| uri.ends_with("/debian")) {
                return Ok(uri.to_owned());
            }
        }
    }
    bail!(
        "no Debian mirror in /etc/apt/sources.list(.d): the kernel matrix downloads Debian's kernel packages"
    )
}
