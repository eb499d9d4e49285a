//! The .deb and the .rpm `cargo xtask dist` made (the suite's `deploy` module): lintian and
//! rpmlint find no error, every warning left is explained below; each package holds exactly
//! the files it must, the policy as a configuration file kept on upgrade, the maintainer
//! scripts of deploy/packaging; each installs into a scratch root and removes cleanly.
//! (Installing on a real systemd host is the systemd guest's test.)

use std::{fs, path::Path, process::Command};

use keepalive_tests::{
    TempDir,
    image::is_dynamically_linked,
    packages::{self, Format},
    repo::{read, root as repo},
    succeeds,
};

fn stdout(command: &mut Command) -> String {
    String::from_utf8_lossy(&succeeds(command).stdout).into_owned()
}

/// lintian's warnings and errors: none. What it would report and is accepted is overridden
/// in deploy/packaging/debian/lintian-overrides, each with the reason.
#[test]
fn lintian_finds_no_error_or_warning_in_the_deb() {
    let out = Command::new("lintian")
        .args(["--fail-on", "error,warning", "--allow-root"])
        .arg(packages::deb())
        .output()
        .unwrap_or_else(|e| panic!("cannot run lintian (Debian package lintian): {e}"));
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success()
            && !report
                .lines()
                .any(|line| line.starts_with("E:") || line.starts_with("W:")),
        "lintian: {}: {report}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// rpmlint's warnings and errors: none, with deploy/packaging/rpm/rpmlint.toml, which says why
/// it silences what it does.
#[test]
fn rpmlint_finds_no_error_or_warning_in_the_rpm() {
    let out = Command::new("rpmlint")
        .arg("--config")
        .arg(repo().join("deploy/packaging/rpm/rpmlint.toml"))
        .arg(packages::rpm())
        .output()
        .unwrap_or_else(|e| panic!("cannot run rpmlint (Debian package rpmlint): {e}"));
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && report.contains(" 0 errors, 0 warnings"),
        "rpmlint: {}: {report}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The files in the package as `dpkg-deb -c` lists them: (mode, path without `./`).
fn deb_files(deb: &Path) -> Vec<(String, String)> {
    let mut files: Vec<(String, String)> = stdout(Command::new("dpkg-deb").arg("-c").arg(deb))
        .lines()
        .filter(|line| !line.starts_with('d'))
        .map(|line| {
            let mode = line.split_whitespace().next().unwrap_or_default();
            let path = line.rsplit(' ').next().unwrap_or_default();
            (mode.to_string(), path.trim_start_matches("./").to_string())
        })
        .collect();
    files.sort_by(|a, b| a.1.cmp(&b.1));
    files
}

/// What every installed copy must hold: the unit with the agent in /usr/bin, the drop-in, the
/// example policy (which the packaged, static agent checks), a binary of this version.
fn assert_installed_tree(root: &Path) {
    let unit = read_file(&root.join("usr/lib/systemd/system/keepalive-agent.service"));
    assert_eq!(unit, packages::packaged_unit());
    // A stop (and so an upgrade's restart) leaves enforcement pinned for the next agent to
    // take over (operations.rs proves --persist does); removal detaches it in prerm.
    let exec_start = unit
        .lines()
        .find(|line| line.starts_with("ExecStart="))
        .unwrap_or_default();
    assert!(
        exec_start.starts_with("ExecStart=/usr/bin/keepalive-agent run ")
            && exec_start.split_whitespace().any(|arg| arg == "--persist"),
        "{exec_start}"
    );
    assert_eq!(
        read_file(&root.join("usr/share/keepalive-agent/before-systemd-253.conf")),
        read("deploy/systemd/keepalive-agent.service.d/before-systemd-253.conf")
    );
    let policy = root.join("etc/keepalive-agent/policy.toml");
    assert_eq!(read_file(&policy), read("examples/policy.toml"));
    let agent = root.join("usr/bin/keepalive-agent");
    assert!(
        !is_dynamically_linked(&agent),
        "the packaged agent is static"
    );
    let version = stdout(Command::new(&agent).arg("--version"));
    assert!(
        version.contains(env!("CARGO_PKG_VERSION")),
        "packaged agent: {version}"
    );
    succeeds(
        Command::new(&agent)
            .arg("check")
            .arg("--config")
            .arg(&policy),
    );
}

fn read_file(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn the_deb_holds_the_agent_unit_policy_as_conffile_docs_and_scripts() {
    let deb = packages::deb();
    let files = deb_files(&deb);
    let paths: Vec<&str> = files.iter().map(|(_, path)| path.as_str()).collect();
    assert_eq!(paths, packages::expected_files(Format::Deb));
    for (mode, path) in &files {
        let expected = if path == "usr/bin/keepalive-agent" {
            "-rwxr-xr-x"
        } else {
            "-rw-r--r--"
        };
        assert_eq!(mode, expected, "{path}");
    }
    let fields = stdout(Command::new("dpkg-deb").arg("--field").arg(&deb).args([
        "Package",
        "Version",
        "Architecture",
    ]));
    assert_eq!(
        fields,
        format!(
            "Package: keepalive-agent\nVersion: {}\nArchitecture: {}\n",
            packages::version(),
            packages::debian_arch()
        )
    );
    assert_eq!(
        stdout(
            Command::new("dpkg-deb")
                .arg("--info")
                .arg(&deb)
                .arg("conffiles")
        ),
        "/etc/keepalive-agent/policy.toml\n"
    );
    let dir = TempDir::new();
    succeeds(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(dir.path()));
    assert_installed_tree(dir.path());
    let control = dir.join("DEBIAN");
    succeeds(Command::new("dpkg-deb").arg("-e").arg(&deb).arg(&control));
    for script in ["postinst", "prerm", "postrm"] {
        assert_eq!(
            read_file(&control.join(script)),
            read(&format!("deploy/packaging/debian/{script}")),
            "{script}"
        );
        succeeds(Command::new("sh").arg("-n").arg(control.join(script)));
    }
}

#[test]
fn the_rpm_holds_the_agent_unit_policy_as_noreplace_config_docs_and_scriptlets() {
    let rpm = packages::rpm();
    let query = |format: &str| stdout(Command::new("rpm").args(["-qp", "--qf", format]).arg(&rpm));
    assert_eq!(
        query("%{NAME} %{VERSION}-%{RELEASE} %{ARCH}"),
        format!(
            "keepalive-agent {} {}",
            packages::version(),
            std::env::consts::ARCH
        )
    );
    let files = query("[%{FILEMODES:perms} %{FILEFLAGS:fflags} %{FILENAMES}\\n]");
    let mut paths: Vec<String> = files
        .lines()
        .filter(|line| !line.starts_with('d'))
        .map(|line| {
            let path = line.rsplit(' ').next().unwrap_or_default();
            path.trim_start_matches('/').to_string()
        })
        .collect();
    paths.sort();
    assert_eq!(paths, packages::expected_files(Format::Rpm));
    assert_eq!(
        stdout(Command::new("rpm").args(["-qlp"]).arg(&rpm))
            .lines()
            .filter(|line| line.starts_with("/etc/"))
            .collect::<Vec<_>>(),
        ["/etc/keepalive-agent/policy.toml"]
    );
    assert!(
        files
            .lines()
            .any(|line| line == "-rw-r--r-- cn /etc/keepalive-agent/policy.toml"),
        "the policy is %config(noreplace): {files}"
    );
    assert!(
        files
            .lines()
            .any(|line| line.starts_with("-rwxr-xr-x ")
                && line.ends_with(" /usr/bin/keepalive-agent")),
        "{files}"
    );
    let scripts = stdout(Command::new("rpm").args(["-qp", "--scripts"]).arg(&rpm));
    for (kind, file) in [
        ("postinstall", "post.sh"),
        ("preuninstall", "preun.sh"),
        ("postuninstall", "postun.sh"),
    ] {
        let script = read(&format!("deploy/packaging/rpm/{file}"));
        assert!(
            scripts.contains(&format!("{kind} scriptlet:\n{script}")),
            "{file}: {scripts}"
        );
        succeeds(
            Command::new("sh")
                .arg("-n")
                .arg(repo().join("deploy/packaging/rpm").join(file)),
        );
    }
}

/// dpkg's own install into an empty root, the maintainer scripts run outside it
/// (`--force-script-chrootless`, which sets `DPKG_ROOT`: they touch only files under it, and
/// neither systemd nor a running agent): the files and the unit's enablement are in place; a
/// reinstall keeps an edited policy; removal leaves the policy (a conffile) and
/// debhelper's enablement state, purging leaves no file.
#[test]
fn the_deb_installs_into_a_scratch_root_and_purges_clean() {
    let deb = packages::deb();
    let root = TempDir::new();
    for dir in ["var/lib/dpkg/updates", "var/lib/dpkg/info"] {
        fs::create_dir_all(root.join(dir)).unwrap();
    }
    fs::write(root.join("var/lib/dpkg/status"), "").unwrap();
    let dpkg = |args: &[&str]| {
        let mut command = Command::new("dpkg");
        command
            .arg(format!("--root={}", root.path().display()))
            .arg("--force-script-chrootless")
            .args(args);
        succeeds(&mut command)
    };
    dpkg(&["--install", &deb.display().to_string()]);
    assert_installed_tree(root.path());
    for path in packages::expected_files(Format::Deb) {
        assert!(root.join(&path).is_file(), "{path} is not installed");
    }
    let enabled = root.join("etc/systemd/system/multi-user.target.wants/keepalive-agent.service");
    assert_eq!(
        fs::read_link(&enabled).unwrap(),
        Path::new("/usr/lib/systemd/system/keepalive-agent.service"),
        "enabled on installation"
    );

    let policy = root.join("etc/keepalive-agent/policy.toml");
    let edited = format!("{}\n# edited by the administrator\n", read_file(&policy));
    fs::write(&policy, &edited).unwrap();
    dpkg(&["--install", &deb.display().to_string()]);
    assert_eq!(
        read_file(&policy),
        edited,
        "a reinstall keeps the edited policy"
    );

    dpkg(&["--remove", "keepalive-agent"]);
    assert_eq!(read_file(&policy), edited, "removal keeps the policy");
    assert!(!root.join("usr/bin/keepalive-agent").exists());
    assert!(
        !root
            .join("usr/lib/systemd/system/keepalive-agent.service.d")
            .exists(),
        "postrm removes the drop-in postinst linked"
    );
    dpkg(&["--purge", "keepalive-agent"]);
    let left: Vec<String> = walk(root.path())
        .into_iter()
        .filter(|path| !path.starts_with("var/lib/dpkg"))
        .filter(|path| !root.join(path).is_dir())
        .collect();
    assert!(left.is_empty(), "left after dpkg --purge: {left:?}");
}

/// rpm's own install into an empty root: files in place and registered, then erased leaving
/// no file but the root's rpm database. The scriptlets do not run (`--noscripts`): rpm runs
/// them chrooted into the root, which has no shell (they are the .deb's scripts' steps, which
/// the test above runs; `sh -n` checks their syntax).
#[test]
fn the_rpm_installs_into_a_scratch_root_and_erases_clean() {
    let rpm = packages::rpm();
    let root = TempDir::new();
    // Debian's rpm keeps its database in ~/.rpmdb unless told.
    let rpm_in_root = || {
        let mut command = Command::new("rpm");
        command
            .arg("--root")
            .arg(root.path())
            .args(["--dbpath", "/var/lib/rpm"]);
        command
    };
    succeeds(rpm_in_root().arg("--initdb"));
    succeeds(
        rpm_in_root()
            .args(["-i", "--nodeps", "--noscripts"])
            .arg(&rpm),
    );
    assert_installed_tree(root.path());
    assert_eq!(
        stdout(rpm_in_root().args(["-q", "keepalive-agent"])),
        format!(
            "keepalive-agent-{}.{}\n",
            packages::version(),
            std::env::consts::ARCH
        )
    );
    let listed = stdout(rpm_in_root().args(["-ql", "keepalive-agent"]));
    for path in packages::expected_files(Format::Rpm) {
        assert!(root.join(&path).is_file(), "{path} is not installed");
        assert!(
            listed.lines().any(|line| line == format!("/{path}")),
            "{path}"
        );
    }
    succeeds(rpm_in_root().args(["-e", "--noscripts", "keepalive-agent"]));
    // Without the scriptlets, the directories stay (postun removes them).
    let left: Vec<String> = walk(root.path())
        .into_iter()
        .filter(|path| !path.starts_with("var/lib/rpm"))
        .filter(|path| !root.join(path).is_dir())
        .collect();
    assert!(left.is_empty(), "left after rpm -e: {left:?}");
}

/// Every file under `dir` (directories only when empty), relative to it.
fn walk(dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(next) = pending.pop() {
        let entries: Vec<_> = fs::read_dir(&next)
            .unwrap_or_else(|e| panic!("{}: {e}", next.display()))
            .map(|entry| entry.unwrap_or_else(|e| panic!("{e}")).path())
            .collect();
        if entries.is_empty() && next != dir {
            found.push(
                next.strip_prefix(dir)
                    .unwrap_or(&next)
                    .display()
                    .to_string(),
            );
        }
        for entry in entries {
            if entry.is_dir() && !entry.is_symlink() {
                pending.push(entry);
            } else {
                found.push(
                    entry
                        .strip_prefix(dir)
                        .unwrap_or(&entry)
                        .display()
                        .to_string(),
                );
            }
        }
    }
    found
}
