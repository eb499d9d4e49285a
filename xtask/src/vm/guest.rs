//! One guest: an initramfs for the kernel (busybox and the modules 9p and the overlay need),
//! then qemu with the host's root shared read-only and a results directory shared
//! read-write. The guest runs `command` (a bash script) and powers off; its console is ours.
//!
//! /dev/kvm on our machines is PVM, under which stock kernels hang, so qemu emulates (TCG).

use std::{
    fs,
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};

use super::debian::Unpacked;
use crate::arch::Arch;

const INIT: &str = include_str!("../../vm/init.sh");
const GUEST: &str = include_str!("../../vm/guest.sh");

/// Modules the first stage loads; their dependencies come from modprobe.
const BOOT_MODULES: &[&str] = &["9p", "9pnet_virtio", "virtio_pci", "overlay"];

/// What the guest runs as PID 1 once the host's root is mounted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Init {
    /// `vm/guest.sh`, which mounts what the tests need and runs the command itself.
    Script,
    /// systemd, which runs the command as a service (`ka-vm.service`): the host root's, or
    /// a newer one unpacked over the guest's root from Debian's packages.
    Systemd(Systemd),
}

/// Which systemd a systemd guest boots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Systemd {
    /// The host root's own (Debian 12: 252).
    Host,
    /// bookworm-backports' (254): `Type=notify-reload` natively.
    Backports,
}

/// What the guest left behind.
#[derive(Debug)]
pub(crate) struct Outcome {
    /// The command's exit status; None when the guest never got to report it.
    pub(crate) status: Option<i32>,
    /// The results directory: `status`, and whatever the command wrote under /ka-vm.
    pub(crate) out: PathBuf,
    pub(crate) wall: Duration,
}

/// Boots `kernel` with `init`, runs `command` in `cwd` inside it, and waits at most `deadline`.
/// `env`: more variables for `vm/guest.sh`. `userland`: for a kernel of another architecture
/// than the host's, a root of that architecture laid over the host's (whose workspace and
/// test binaries show through).
#[expect(
    clippy::too_many_arguments,
    reason = "each is one thing the guest is made of; a struct would only rename them"
)]
pub(crate) fn run(
    kernel: &Unpacked,
    userland: Option<&Path>,
    init: Init,
    env: &[(&str, &Path)],
    out: &Path,
    cwd: &Path,
    command: &str,
    deadline: Duration,
) -> anyhow::Result<Outcome> {
    let busybox = userland.map_or_else(
        || PathBuf::from("/bin/busybox"),
        |root| root.join("usr/bin/busybox"),
    );
    let initrd = initramfs(kernel, &busybox)?;
    let _ignored = fs::remove_dir_all(out);
    fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    fs::write(out.join("guest.sh"), GUEST)?;
    fs::write(out.join("command"), command)?;
    let mut vars = format!(
        "export KA_VM_MODULES={}\nexport KA_VM_CWD={}\nexport KA_VM_INIT={}\n",
        shell_quote(&kernel.modules),
        shell_quote(cwd),
        match init {
            Init::Script => "script",
            Init::Systemd(_) => "systemd",
        }
    );
    for (name, value) in env {
        vars.push_str(&format!("export {name}={}\n", shell_quote(value)));
    }
    fs::write(out.join("env"), vars)?;

    let started = Instant::now();
    let mut qemu = Command::new(qemu_program(kernel.arch));
    qemu.args(["-accel", "tcg,thread=multi"])
        .args(machine(kernel.arch))
        .args(["-smp", "2", "-m", "3G", "-nic", "none", "-no-reboot"])
        .args(["-display", "none", "-monitor", "none", "-serial", "stdio"])
        .arg("-kernel")
        .arg(&kernel.vmlinuz)
        .arg("-initrd")
        .arg(&initrd)
        .arg("-append")
        .arg(format!(
            "console={} quiet loglevel=3 panic=-1 mitigations=off{}",
            match kernel.arch {
                Arch::X86_64 => "ttyS0",
                Arch::Aarch64 => "ttyAMA0",
            },
            if userland.is_some() {
                " ka_vm_userland"
            } else {
                ""
            }
        ))
        .arg("-virtfs")
        .arg("local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap")
        .arg("-virtfs")
        .arg(format!(
            "local,path={},mount_tag=out,security_model=none",
            out.display()
        ))
        .stdin(Stdio::null());
    if let Some(root) = userland {
        qemu.arg("-virtfs").arg(format!(
            "local,path={},mount_tag=userland,security_model=none,readonly=on,multidevs=remap",
            root.display()
        ));
    }
    let mut child = qemu
        .spawn()
        .with_context(|| format!("cannot start {}", qemu_program(kernel.arch)))?;
    loop {
        if child.try_wait()?.is_some() {
            break;
        }
        if started.elapsed() > deadline {
            let _ignored = child.kill();
            let _ignored = child.wait();
            eprintln!(
                "xtask: the {} guest ran past {} s: stopped",
                kernel.release,
                deadline.as_secs()
            );
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let status = fs::read_to_string(out.join("status"))
        .ok()
        .and_then(|text| text.trim().parse().ok());
    Ok(Outcome {
        status,
        out: out.to_path_buf(),
        wall: started.elapsed(),
    })
}

/// The qemu that emulates `arch`.
pub(crate) const fn qemu_program(arch: Arch) -> &'static str {
    match arch {
        Arch::X86_64 => "qemu-system-x86_64",
        Arch::Aarch64 => "qemu-system-aarch64",
    }
}

/// The emulated machine and CPU.
const fn machine(arch: Arch) -> [&'static str; 4] {
    match arch {
        Arch::X86_64 => ["-machine", "q35", "-cpu", "max"],
        // Pointer authentication with QEMU's own cheap algorithm: the architected one (QARMA)
        // costs much of TCG's time.
        Arch::Aarch64 => ["-machine", "virt", "-cpu", "max,pauth-impdef=on"],
    }
}

/// `initrd.gz` beside the kernel: `busybox` (of the kernel's architecture) as `/bin/busybox`,
/// `vm/init.sh` as `/init`, the boot modules (decompressed: busybox's insmod reads plain .ko)
/// and their load order.
fn initramfs(kernel: &Unpacked, busybox: &Path) -> anyhow::Result<PathBuf> {
    let dir = kernel
        .modules
        .ancestors()
        .nth(4)
        .context("the modules directory has no cache directory above it")?
        .to_path_buf();
    let initrd = dir.join("initrd.gz");
    let tree = dir.join("initramfs");
    let _ignored = fs::remove_dir_all(&tree);
    for sub in ["bin", "modules", "proc", "sys", "dev"] {
        fs::create_dir_all(tree.join(sub))?;
    }
    ensure!(
        busybox.exists(),
        "{} is missing (Debian package busybox-static)",
        busybox.display()
    );
    fs::copy(busybox, tree.join("bin/busybox")).context("cannot copy busybox")?;
    fs::write(tree.join("init"), INIT)?;
    set_executable(&tree.join("init"))?;

    let mut order = String::new();
    for module in boot_modules(kernel)? {
        let name = module
            .file_name()
            .and_then(|name| name.to_str())
            .context("module without a name")?;
        let plain = name.strip_suffix(".xz").unwrap_or(name);
        let target = tree.join("modules").join(plain);
        if name.ends_with(".xz") {
            let out = Command::new("xz")
                .arg("-dc")
                .arg(&module)
                .output()
                .context("xz -dc")?;
            ensure!(out.status.success(), "xz -dc {} failed", module.display());
            fs::write(&target, out.stdout)?;
        } else {
            fs::copy(&module, &target)?;
        }
        order.push_str(plain);
        order.push('\n');
    }
    fs::write(tree.join("modules/order"), order)?;

    // newc cpio of the tree, gzip'd: what the kernel unpacks as its first root.
    let cpio = Command::new("sh")
        .arg("-c")
        .arg("find . | cpio -o -H newc --quiet | gzip -1")
        .current_dir(&tree)
        .output()
        .context("cannot run cpio")?;
    ensure!(cpio.status.success(), "cpio of the initramfs failed");
    fs::File::create(&initrd)?.write_all(&cpio.stdout)?;
    let _ignored = fs::remove_dir_all(&tree);
    Ok(initrd)
}

/// The module files of [`BOOT_MODULES`] and their dependencies, in load order, once each.
fn boot_modules(kernel: &Unpacked) -> anyhow::Result<Vec<PathBuf>> {
    let base = kernel
        .modules
        .ancestors()
        .nth(3)
        .context("the modules directory is not <root>/lib/modules/<release>")?;
    let mut modules: Vec<PathBuf> = Vec::new();
    for name in BOOT_MODULES {
        let out = Command::new("modprobe")
            .arg("-d")
            .arg(base)
            .args(["-S", &kernel.release, "--show-depends", name])
            .output()
            .context("cannot run modprobe (Debian package kmod)")?;
        if !out.status.success() {
            bail!(
                "modprobe --show-depends {name} for {}: {}",
                kernel.release,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            // "builtin NAME" needs nothing; "insmod PATH [options]" needs PATH.
            if let Some(path) = line
                .strip_prefix("insmod ")
                .and_then(|rest| rest.split_whitespace().next())
            {
                let path = PathBuf::from(path);
                if !modules.contains(&path) {
                    modules.push(path);
                }
            }
        }
    }
    Ok(modules)
}

fn set_executable(path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    fs::set_permissions(path, fs::Permissions::from_mode(0o755))
        .with_context(|| format!("cannot chmod {}", path.display()))
}

/// `path` in single quotes for bash.
pub(crate) fn shell_quote(path: &Path) -> String {
    format!("'{}'", path.display().to_string().replace('\'', r"'\''"))
}
