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

use crate::{arch::Arch, cmd::run_status};

/// A kernel of the matrix: the name users pass to `--kernel`, the Debian suite it comes from
/// and its architecture.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Kernel {
    pub(crate) name: &'static str,
    suite: &'static str,
    pub(crate) arch: Arch,
}

/// Amazon Linux 2 (5.10), Debian 12 / AL2023 / COS (6.1), the newer LTS (6.12); on x86-64,
/// then on arm64 (Graviton, Ampere, Cobalt, Axion run the same generations).
pub(crate) const MATRIX: &[Kernel] = &[
    Kernel {
        name: "5.10",
        suite: "bullseye",
        arch: Arch::X86_64,
    },
    Kernel {
        name: "6.1",
        suite: "bookworm",
        arch: Arch::X86_64,
    },
    Kernel {
        name: "6.12",
        suite: "bookworm-backports",
        arch: Arch::X86_64,
    },
    Kernel {
        name: "arm64-5.10",
        suite: "bullseye",
        arch: Arch::Aarch64,
    },
    Kernel {
        name: "arm64-6.1",
        suite: "bookworm",
        arch: Arch::Aarch64,
    },
    Kernel {
        name: "arm64-6.12",
        suite: "bookworm-backports",
        arch: Arch::Aarch64,
    },
];

/// A kernel unpacked in the cache.
#[derive(Debug, Clone)]
pub(crate) struct Unpacked {
    pub(crate) arch: Arch,
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
    let apt = Apt::new(kernel.suite, kernel.arch, cache)?;
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
        arch: kernel.arch,
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
    let apt = Apt::new(SYSTEMD_SUITE, Arch::X86_64, cache)?;
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

/// What a guest of another architecture than the host's runs besides the test binaries: the
/// programs the suite and `vm/guest.sh` call (bash, ip, ss, nft, conntrack, bpftool, python3,
/// mount, modprobe for the kernel's module autoloading), with their dependencies; and busybox
/// for the initramfs.
const ROOT_PACKAGES: &[&str] = &[
    "bash",
    "dash",
    "coreutils",
    "util-linux",
    "mount",
    "procps",
    "kmod",
    "hostname",
    "findutils",
    "grep",
    "sed",
    "gawk",
    "tar",
    "gzip",
    "libc-bin",
    "iproute2",
    "nftables",
    "conntrack",
    "bpftool",
    "python3",
    // deploy.rs installs the packages.
    "dpkg",
    "rpm",
    "busybox-static",
];
const ROOT_SUITE: &str = "bookworm";

/// Debian 12's userland of `arch` unpacked into the cache (once per set of package versions):
/// [`ROOT_PACKAGES`] and what they depend on, extracted without their maintainer scripts
/// (which would need the architecture's CPU) into a merged-/usr root. The guest lays it over
/// the host's root, whose workspace and test binaries then show through.
pub(crate) fn fetch_root(arch: Arch, cache: &Path) -> anyhow::Result<PathBuf> {
    let apt = Apt::new(ROOT_SUITE, arch, cache)?;
    let debs = apt.download_with_dependencies(ROOT_PACKAGES)?;
    let mut names: Vec<String> = debs
        .iter()
        .filter_map(|deb| deb.file_name()?.to_str().map(str::to_owned))
        .collect();
    names.sort();
    let dir = cache.join(format!("root-{ROOT_SUITE}-{}", arch.debian()));
    let root = dir.join("root");
    // Lists the packages unpacked: any new version (a point release) unpacks anew.
    let done = dir.join("unpacked");
    let unpacked = names.join("\n");
    if fs::read_to_string(&done).ok().as_deref() != Some(unpacked.as_str()) {
        let _ignored = fs::remove_dir_all(&dir);
        fs::create_dir_all(root.join("usr"))
            .with_context(|| format!("cannot create {}", root.display()))?;
        eprintln!(
            "xtask: unpacking Debian {ROOT_SUITE}'s {} userland ({} packages)",
            arch.debian(),
            debs.len()
        );
        // Merged /usr, as Debian 12 installs it; tar keeps these links.
        for dir in ["bin", "sbin", "lib"] {
            fs::create_dir_all(root.join("usr").join(dir))?;
            std::os::unix::fs::symlink(format!("usr/{dir}"), root.join(dir))
                .with_context(|| format!("cannot link {dir} in {}", root.display()))?;
        }
        // The list in a file: a command line of 150 paths says nothing in the log.
        let list = dir.join("packages");
        let paths: Vec<String> = debs.iter().map(|deb| deb.display().to_string()).collect();
        fs::write(&list, paths.join("\n") + "\n").context("cannot write the package list")?;
        run_status(
            Command::new("sh")
                .arg("-c")
                .arg(
                    "while read -r deb; do dpkg-deb --fsys-tarfile \"$deb\" \
                     | tar -x --keep-directory-symlink -C \"$1\" || exit; done <\"$2\"",
                )
                .arg("sh")
                .arg(&root)
                .arg(&list),
        )
        .context("cannot unpack the guest's userland")?;
        fs::write(&done, unpacked).context("cannot mark the root unpacked")?;
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

/// apt with a sources list of one suite and architecture, and package lists of its own.
#[derive(Debug)]
struct Apt {
    options: Vec<String>,
    arch: Arch,
    state: PathBuf,
}

impl Apt {
    /// Its state in `<cache>/apt/<suite>` (x86-64) or `<cache>/apt/<suite>-<arch>`.
    fn new(suite: &str, arch: Arch, cache: &Path) -> anyhow::Result<Self> {
        let state = match arch {
            Arch::X86_64 => cache.join("apt").join(suite),
            Arch::Aarch64 => cache.join("apt").join(format!("{suite}-{}", arch.debian())),
        };
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
                "deb [arch={} signed-by={KEYRING}] {} {suite} main\n",
                arch.debian(),
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
            format!("APT::Architecture={}", arch.debian()),
            format!("APT::Architectures={}", arch.debian()),
        ];
        let apt = Self {
            options,
            arch,
            state: state.clone(),
        };
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

    /// The `linux-image-<release>` that the suite's `linux-image-<arch>` depends on.
    fn image_package(&self) -> anyhow::Result<String> {
        let meta = format!("linux-image-{}", self.arch.debian());
        let out = self
            .command("apt-cache")
            .args(["depends", &meta])
            .output()
            .context("apt-cache depends")?;
        ensure!(out.status.success(), "apt-cache depends {meta} failed");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find_map(|line| {
                let package = line.trim().strip_prefix("Depends: ")?;
                package
                    .starts_with("linux-image-")
                    .then(|| package.to_owned())
            })
            .with_context(|| format!("{meta} depends on no linux-image package"))
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

    /// Downloads `packages` and everything they depend on into apt's archive cache, as if
    /// installing them on an empty system; returns the .deb files.
    fn download_with_dependencies(&self, packages: &[&str]) -> anyhow::Result<Vec<PathBuf>> {
        let status = self.state.join("empty-status");
        fs::write(&status, "").context("cannot write an empty dpkg status")?;
        // Nothing is installed, and the host's dpkg is not this one: no dpkg state, no lock.
        let apt_get = || {
            let mut command = self.command("apt-get");
            command
                .arg("-o")
                .arg(format!("Dir::State::status={}", status.display()))
                .args(["-o", "Debug::NoLocking=true"]);
            command
        };
        run_status(
            apt_get()
                .args(["install", "-qq", "--yes", "--download-only"])
                .args(["--no-install-recommends"])
                .args(packages),
        )
        .context("cannot download the guest's userland")?;
        // Earlier versions of these packages go: what is left is what apt just chose.
        run_status(apt_get().args(["autoclean", "-qq"]))?;
        let archives = self.state.join("cache/archives");
        let mut debs: Vec<PathBuf> = fs::read_dir(&archives)
            .with_context(|| format!("cannot list {}", archives.display()))?
            .flatten()
            .map(|entry| entry.path())
            .filter(|path| path.extension().is_some_and(|ext| ext == "deb"))
            .collect();
        debs.sort();
        ensure!(!debs.is_empty(), "apt downloaded no packages");
        Ok(debs)
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
