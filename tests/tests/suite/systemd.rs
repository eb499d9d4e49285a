//! The .deb under a real systemd. `cargo xtask test --kernel systemd` boots Debian 12's kernel
//! twice, with the host root's systemd (252) and with bookworm-backports' (254) as PID 1, and
//! runs these tests as a service there: each installs the package with `dpkg -i` where it is
//! not installed and drives the packaged unit as an operator would. Everywhere else they are
//! ignored: they need systemd as PID 1, and they install a package and change /etc.
//!
//! systemd 252 predates Type=notify-reload, so there the package's postinst gives the unit its
//! drop-in (Type=notify, ExecReload=kill -HUP): `systemctl start` waits for READY=1, and
//! `systemctl reload` returns once the signal is sent. From 253 the unit is notify-reload, and
//! reload returns once the agent has applied the policy.

use std::{
    fs,
    net::{TcpListener, TcpStream},
    path::Path,
    process::{Command, Output},
    time::Duration,
};

use keepalive_tests::{Keepalive, packages, poll, succeeds, wait_for};

const NEEDS: &str =
    "needs systemd as PID 1 and installs a package: cargo xtask test --kernel systemd";
const UNIT: &str = "keepalive-agent.service";
const POLICY: &str = "/etc/keepalive-agent/policy.toml";
const PINS: &str = "/sys/fs/bpf/keepalive-agent";
/// The unit's WatchdogSec= and TimeoutAbortSec= (a stopped agent ignores the watchdog's
/// SIGABRT until then: SIGKILL follows).
const WATCHDOG: Duration = Duration::from_secs(30);
const ABORT: Duration = Duration::from_secs(10);
/// Starting, stopping, restarting under emulation.
const SETTLE: Duration = Duration::from_secs(60);

fn require_systemd() {
    let init = fs::read_to_string("/proc/1/comm").unwrap_or_default();
    assert!(
        init.trim() == "systemd" && Path::new("/run/systemd/system").is_dir(),
        "PID 1 is {:?}, not systemd: this test {NEEDS}",
        init.trim()
    );
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"))
}

fn systemctl(args: &[&str]) -> String {
    text(&succeeds(Command::new("systemctl").args(args)))
}

fn property(name: &str) -> String {
    systemctl(&["show", "--property", name, "--value", UNIT])
        .trim()
        .to_owned()
}

/// The running systemd's version (`systemctl --version`: "systemd 254 (254.26-1~bpo12+1)").
fn systemd_version() -> u32 {
    let out = systemctl(&["--version"]);
    out.split_whitespace()
        .nth(1)
        .and_then(|version| version.parse().ok())
        .unwrap_or_else(|| panic!("no version in {out:?}"))
}

fn main_pid() -> u32 {
    property("MainPID").parse().unwrap_or(0)
}

fn is_active() -> bool {
    run("systemctl", &["is-active", "--quiet", UNIT])
        .status
        .success()
}

fn installed() -> bool {
    let out = run(
        "dpkg-query",
        &["--show", "--showformat=${Status}", "keepalive-agent"],
    );
    String::from_utf8_lossy(&out.stdout) == "install ok installed"
}

/// The package installed (by `dpkg -i`, which starts the agent) and the agent active.
fn install() {
    require_systemd();
    if !installed() {
        let deb = packages::deb();
        succeeds(Command::new("dpkg").arg("-i").arg(&deb));
    }
    if poll(SETTLE, || is_active().then_some(())).is_none() {
        panic!(
            "the installed agent is not active:\n{}\n{}",
            text(&run("systemctl", &["status", "--no-pager", UNIT])),
            text(&run(
                "journalctl",
                &["--unit", UNIT, "--lines", "60", "--no-pager"]
            ))
        );
    }
}

/// The package installed and its agent restarted with [`write_policy`]'s `idle`.
fn enforcing(idle: u32) {
    install();
    write_policy(idle);
    systemctl(&["restart", UNIT]);
}

/// A policy for the whole machine whose idle time tells which one a connection got.
fn write_policy(idle: u32) {
    let policy = format!(
        "[agent]\ncgroups = [\"/\"]\nexisting = true\n\n[default]\nidle = \"{idle}s\"\n\
         interval = \"7s\"\ncount = 4\n"
    );
    fs::write(POLICY, policy).unwrap_or_else(|e| panic!("cannot write {POLICY}: {e}"));
}

fn expected(idle: u32) -> Keepalive {
    Keepalive {
        enabled: true,
        idle_secs: idle,
        interval_secs: 7,
        count: 4,
        user_timeout_ms: 0,
    }
}

/// A new loopback connection (IPv4 or IPv6): both ends, as the kernel reports them.
fn new_connection(ip: &str) -> (Keepalive, Keepalive) {
    let (client, server) = open_connection(ip);
    (Keepalive::of(&client), Keepalive::of(&server))
}

fn open_connection(ip: &str) -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind((ip, 0)).unwrap_or_else(|e| panic!("bind {ip}: {e}"));
    let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (server, _) = listener.accept().unwrap();
    (client, server)
}

fn assert_new_connections_have(want: Keepalive, when: &str) {
    for ip in ["127.0.0.1", "::1"] {
        let (client, server) = new_connection(ip);
        assert_eq!(client, want, "{when}: a new connection's client end ({ip})");
        assert_eq!(server, want, "{when}: a new connection's server end ({ip})");
    }
}

/// Where the journal is now, to read only what follows.
fn journal_cursor() -> String {
    let out = text(&succeeds(Command::new("journalctl").args([
        "--show-cursor",
        "--lines=0",
        "--quiet",
    ])));
    out.lines()
        .find_map(|line| line.strip_prefix("-- cursor: "))
        .unwrap_or_else(|| panic!("no cursor in {out:?}"))
        .to_owned()
}

/// The unit's journal entries after `cursor`, and systemd's own about it.
fn journal_since(cursor: &str, format: &str) -> String {
    text(&succeeds(Command::new("journalctl").args([
        "--unit",
        UNIT,
        "--after-cursor",
        cursor,
        "--output",
        format,
        "--no-pager",
    ])))
}

#[test]
#[ignore = "needs systemd as PID 1 and installs a package: cargo xtask test --kernel systemd"]
fn install_starts_the_agent_and_start_returns_once_enforcement_is_live() {
    require_systemd();
    if installed() {
        succeeds(Command::new("dpkg").args(["--purge", "keepalive-agent"]));
    }
    install();
    let status = run("systemctl", &["status", "--no-pager", UNIT]);
    assert!(
        status.status.success() && text(&status).contains("active (running)"),
        "systemctl status after dpkg -i:\n{}",
        text(&status)
    );
    // The example policy installed as /etc/keepalive-agent/policy.toml: its default applies to
    // loopback connections (its rules name other addresses, ports and containers).
    let (client, server) = new_connection("127.0.0.1");
    assert!(
        client.enabled && server.enabled,
        "after dpkg -i, a new connection has keepalive: {client:?} {server:?}"
    );

    systemctl(&["stop", UNIT]);
    assert!(!is_active(), "stopped");
    write_policy(41);
    // Type=notify: start returns after READY=1, which the agent sends once the policy is live.
    systemctl(&["start", UNIT]);
    assert_new_connections_have(expected(41), "right after systemctl start returned");
    assert!(is_active(), "active after start");
}

#[test]
#[ignore = "needs systemd as PID 1 and installs a package: cargo xtask test --kernel systemd"]
fn reload_applies_a_changed_policy() {
    enforcing(42);
    assert_new_connections_have(expected(42), "after restart");
    let pid = main_pid();

    write_policy(43);
    systemctl(&["reload", UNIT]);
    // The guest that unpacked a newer systemd says so (vm/guest.sh).
    if std::env::var_os("KA_VM_SYSTEMD_ROOT").is_some() {
        assert!(
            systemd_version() >= 253,
            "the backports guest runs systemd 253+"
        );
    }
    if systemd_version() >= 253 {
        assert_eq!(property("Type"), "notify-reload", "no drop-in from 253 on");
        assert_new_connections_have(expected(43), "right after systemctl reload returned");
    } else {
        // systemd 252's reload (the drop-in's kill -HUP) does not wait for the agent.
        let applied = poll(SETTLE, || {
            (new_connection("127.0.0.1").0 == expected(43)).then_some(())
        });
        assert!(
            applied.is_some(),
            "after systemctl reload, new connections have {:?}, not idle 43",
            new_connection("127.0.0.1").0
        );
        assert_new_connections_have(expected(43), "after the reload");
    }
    assert_eq!(main_pid(), pid, "a reload, not a restart");
}

#[test]
#[ignore = "needs systemd as PID 1 and installs a package: cargo xtask test --kernel systemd"]
fn a_killed_agent_is_restarted_and_connections_meanwhile_are_enforced() {
    enforcing(44);
    let pid = main_pid();
    let restarts: u32 = property("NRestarts").parse().unwrap_or(0);
    assert!(pid > 0, "a main process");

    succeeds(Command::new("kill").args(["-KILL", &pid.to_string()]));
    // The program stays attached through the pins (--persist) while no agent runs.
    assert_new_connections_have(expected(44), "right after kill -9 of the agent");
    let new_pid = wait_for("systemd to restart the killed agent", SETTLE, || {
        let now = main_pid();
        (now != 0 && now != pid && is_active()).then_some(now)
    });
    assert!(
        property("NRestarts").parse::<u32>().unwrap_or(0) > restarts,
        "NRestarts counts the restart of {pid} as {new_pid}"
    );
    assert_new_connections_have(expected(44), "after the restart");
}

#[test]
#[ignore = "needs systemd as PID 1 and installs a package: cargo xtask test --kernel systemd"]
fn the_watchdog_restarts_a_stopped_agent() {
    enforcing(45);
    let pid = main_pid();
    let cursor = journal_cursor();

    succeeds(Command::new("kill").args(["-STOP", &pid.to_string()]));
    // Within WatchdogSec, TimeoutAbortSec and RestartSec, and what emulation adds.
    let new_pid = poll(WATCHDOG + ABORT + Duration::from_secs(20), || {
        let now = main_pid();
        (now != 0 && now != pid && is_active()).then_some(now)
    });
    let journal = journal_since(&cursor, "short");
    if new_pid.is_none() {
        let _ignored = run("kill", &["-CONT", &pid.to_string()]);
        panic!("a SIGSTOPped agent was not restarted in time:\n{journal}");
    }
    assert!(
        journal.contains("Failed with result 'watchdog'"),
        "the restart came from the watchdog:\n{journal}"
    );
    assert_new_connections_have(expected(45), "after the watchdog's restart");
}

#[test]
#[ignore = "needs systemd as PID 1 and installs a package: cargo xtask test --kernel systemd"]
fn an_upgrade_restarts_the_agent_without_a_gap() {
    use std::sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    };

    enforcing(50);
    let pid = main_pid();
    // Connections open all through the upgrade: each must have the policy.
    let done = Arc::new(AtomicBool::new(false));
    let opener = {
        let done = Arc::clone(&done);
        std::thread::spawn(move || {
            let mut seen = Vec::new();
            while !done.load(Ordering::Relaxed) {
                seen.push(new_connection("127.0.0.1").0);
            }
            seen
        })
    };
    // dpkg -i of the installed version runs the upgrade's scripts (prerm upgrade, postinst
    // configure with the old version): the agent is restarted with the package's binary.
    succeeds(Command::new("dpkg").arg("-i").arg(packages::deb()));
    wait_for("the upgraded agent to be active", SETTLE, || {
        let now = main_pid();
        (now != 0 && now != pid && is_active()).then_some(())
    });
    done.store(true, Ordering::Relaxed);
    let seen = opener.join().unwrap();
    let gaps: Vec<_> = seen.iter().filter(|got| **got != expected(50)).collect();
    assert!(
        seen.len() > 10,
        "only {} connections during the upgrade",
        seen.len()
    );
    assert!(
        gaps.is_empty(),
        "{} of {} connections opened during the upgrade missed the policy: {:?}",
        gaps.len(),
        seen.len(),
        gaps.first()
    );
}

/// A real containerd, as a transient unit, with its socket where the agent looks for it.
struct Containerd;

impl Containerd {
    const UNIT: &str = "ka-test-containerd.service";
    const SOCKET: &str = "/run/containerd/containerd.sock";

    fn start() -> Self {
        let root = std::env::temp_dir().join("ka-test-containerd");
        succeeds(
            Command::new("systemd-run")
                .args(["--unit", Self::UNIT, "--collect", "containerd", "--root"])
                .arg(&root)
                .args([
                    "--state",
                    "/run/ka-test-containerd",
                    "--address",
                    Self::SOCKET,
                ]),
        );
        wait_for("containerd's socket", SETTLE, || {
            Path::new(Self::SOCKET).exists().then_some(())
        });
        Self
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ignored = run("systemctl", &["stop", Self::UNIT]);
    }
}

#[test]
#[ignore = "needs systemd as PID 1 and installs a package: cargo xtask test --kernel systemd"]
fn under_the_units_hardening_nothing_is_denied() {
    install();
    let _containerd = Containerd::start();
    let cursor = journal_cursor();

    // Connections that exist before a start and before a reload: the agent's sweep updates them,
    // through the kernel's TCP iterator (auto, here) and through the owners' descriptors.
    write_policy(46);
    let before_start = open_connection("127.0.0.1");
    systemctl(&["restart", UNIT]);
    wait_for("the sweep at start", SETTLE, || {
        (Keepalive::of(&before_start.0) == expected(46)).then_some(())
    });
    let dropin = "/run/systemd/system/keepalive-agent.service.d/ka-test-existing-via.conf";
    fs::create_dir_all(Path::new(dropin).parent().unwrap()).unwrap();
    fs::write(
        dropin,
        "[Service]\nEnvironment=KEEPALIVE_AGENT_EXISTING_VIA=descriptors\n",
    )
    .unwrap();
    systemctl(&["daemon-reload"]);
    write_policy(47);
    let before_reload = open_connection("::1");
    systemctl(&["restart", UNIT]);
    write_policy(48);
    systemctl(&["reload", UNIT]);
    let swept = poll(SETTLE, || {
        (Keepalive::of(&before_reload.0) == expected(48)).then_some(())
    });
    fs::remove_file(dropin).unwrap();
    systemctl(&["daemon-reload"]);
    systemctl(&["restart", UNIT]);
    let journal = journal_since(&cursor, "short");
    assert!(
        swept.is_some(),
        "the sweep through descriptors at reload left {:?}:\n{journal}",
        Keepalive::of(&before_reload.0)
    );

    for denied in [
        "Operation not permitted",
        "Permission denied",
        "EPERM",
        "EACCES",
        "Read-only file system",
        "SIGSYS",
        "status=31/SYS",
    ] {
        assert!(
            !journal.contains(denied),
            "{denied:?} in the unit's journal:\n{journal}"
        );
    }
    assert!(
        journal.contains("following the container engine"),
        "the agent reached containerd's socket:\n{journal}"
    );
    // Restarts asked for count in NRestarts too: the agent's own end is what must not be seen.
    for failed in ["Failed with result", "Main process exited, code=killed"] {
        assert!(
            !journal.contains(failed),
            "the agent failed under the hardening:\n{journal}"
        );
    }
}

#[test]
#[ignore = "needs systemd as PID 1 and installs a package: cargo xtask test --kernel systemd"]
fn the_journal_holds_the_structured_fields() {
    install();
    let cursor = journal_cursor();
    systemctl(&["restart", UNIT]);
    let verbose = journal_since(&cursor, "verbose");
    // One entry: a line of its date and cursor, then its fields indented.
    let mut entries: Vec<String> = Vec::new();
    for line in verbose.lines() {
        match entries.last_mut() {
            Some(entry) if line.starts_with(' ') => {
                entry.push_str(line.trim());
                entry.push('\n');
            }
            _ => entries.push(String::new()),
        }
    }
    let attached = entries
        .iter()
        .find(|entry| {
            entry
                .lines()
                .any(|field| field.starts_with("MESSAGE=attached"))
        })
        .unwrap_or_else(|| panic!("no 'attached' entry in:\n{verbose}"));
    for field in [
        "PRIORITY=6",
        "SYSLOG_IDENTIFIER=keepalive-agent",
        "F_CGROUP=/",
        "_SYSTEMD_UNIT=keepalive-agent.service",
    ] {
        assert!(
            attached.lines().any(|line| line == field),
            "{field} not in the 'attached' entry:\n{attached}"
        );
    }
}

#[test]
#[ignore = "needs systemd as PID 1 and installs a package: cargo xtask test --kernel systemd"]
fn systemd_analyze_security_scores_the_installed_unit_at_most_3() {
    install();
    let out = text(&run("systemd-analyze", &["security", "--no-pager", UNIT]));
    let score: f64 = out
        .lines()
        .find_map(|line| line.split_once("Overall exposure level for keepalive-agent.service:"))
        .and_then(|(_, rest)| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no overall exposure level in:\n{out}"));
    assert!(score <= 3.0, "exposure {score} > 3.0:\n{out}");
}

#[test]
#[ignore = "needs systemd as PID 1 and installs a package: cargo xtask test --kernel systemd"]
fn remove_stops_and_detaches_and_purge_leaves_nothing() {
    enforcing(49);
    assert_new_connections_have(expected(49), "installed");

    succeeds(Command::new("dpkg").args(["--remove", "keepalive-agent"]));
    assert!(!is_active(), "dpkg -r stops the agent");
    let pins: Vec<_> = fs::read_dir(PINS)
        .map(|dir| dir.flatten().map(|entry| entry.path()).collect())
        .unwrap_or_default();
    assert!(pins.is_empty(), "dpkg -r leaves pins: {pins:?}");
    let (client, server) = new_connection("127.0.0.1");
    assert!(
        !client.enabled && !server.enabled,
        "after dpkg -r a new connection is the kernel's own: {client:?} {server:?}"
    );
    assert!(
        Path::new(POLICY).exists(),
        "dpkg -r keeps the policy, a conffile"
    );

    succeeds(Command::new("dpkg").args(["--purge", "keepalive-agent"]));
    for gone in [
        "/etc/keepalive-agent",
        "/run/keepalive-agent",
        "/usr/bin/keepalive-agent",
        "/usr/lib/systemd/system/keepalive-agent.service",
        "/usr/lib/systemd/system/keepalive-agent.service.d",
        "/etc/systemd/system/multi-user.target.wants/keepalive-agent.service",
        PINS,
    ] {
        assert!(!Path::new(gone).exists(), "{gone} is left after dpkg -P");
    }
    let unit = run("systemctl", &["status", UNIT]);
    assert_eq!(
        unit.status.code(),
        Some(4),
        "systemd knows no keepalive-agent unit after dpkg -P:\n{}",
        text(&unit)
    );
}
