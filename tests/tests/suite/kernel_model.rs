//! The kernel's decisions against the reference model, by property: random policies over a
//! small cgroup tree, random real connections between workers in those cgroups, and for each
//! end of each connection the values the kernel gave it (getsockopt) and the counter it
//! bumped must be what `Policy::decide` says. Shrunk counterexamples are kept in
//! `proptest-regressions/kernel_model.txt` and replayed first on every run.

use std::{
    net::{IpAddr, TcpStream},
    os::fd::OwnedFd,
};

use keepalive_agent::{
    Action, CgroupPath, Enforcer, Mode, Policy, Rule, Values,
    enforcer::features,
    policy::{Cidr, Connection, Decision, Direction, PortRange},
};
use keepalive_common::{Outcome, Stage};
use keepalive_tests::{Keepalive, Netns, Placement, TestCgroup, Workload, load_enforcer, probe};
use proptest::{
    prelude::*,
    test_runner::{Config, FileFailurePersistence, TestCaseError, TestRunner},
};

/// The tree, relative to the test's cgroup; worker `k` lives in `CGROUPS[k]`.
const CGROUPS: [&str; 4] = ["", "a", "a/b", "c"];
/// Worker `k` listens on `7000 + 10 k` and `7001 + 10 k`.
fn port(worker: usize, which: usize) -> u16 {
    u16::try_from(7000 + 10 * worker + which).unwrap()
}
/// Where clients connect: loopback, a second loopback address, addresses added to `lo`, and
/// IPv4-mapped IPv6 (an AF_INET6 socket to an IPv4 peer).
const TARGETS: [&str; 7] = [
    "127.0.0.1",
    "127.0.0.2",
    "10.9.1.1",
    "::1",
    "fd00:9::1",
    "::ffff:127.0.0.1",
    "::ffff:10.9.1.1",
];
const CIDRS: [&str; 8] = [
    "127.0.0.0/8",
    "127.0.0.2/32",
    "10.9.0.0/16",
    "::1/128",
    "fd00:9::/32",
    "0.0.0.0/0",
    "::/0",
    "10.9.1.0/24",
];
const PORTS: [(u16, u16); 8] = [
    (7000, 7009),
    (7010, 7019),
    (7001, 7001),
    (7020, 7039),
    (7011, 7021),
    (32768, 60999),
    (40000, 65535),
    (1, 65535),
];
const DEFAULT_IDLE: u32 = 99;

/// Drops in field order: workers, then their cgroups and namespace, then the programs.
struct World {
    workers: Vec<Workload>,
    /// `cgroups[k]` is `CGROUPS[k]`.
    cgroups: Vec<TestCgroup>,
    netns: Netns,
    enforcer: Enforcer,
}

impl World {
    fn new() -> Self {
        let enforcer = load_enforcer(Stage::Full);
        let netns = Netns::new();
        netns.ip(&["addr", "add", "10.9.1.1/32", "dev", "lo"]);
        netns.ip(&["addr", "add", "fd00:9::1/128", "dev", "lo"]);
        let root = TestCgroup::new();
        let a = root.child("a");
        let b = a.child("b");
        let c = root.child("c");
        let cgroups = vec![root, a, b, c];
        let workers = cgroups
            .iter()
            .enumerate()
            .map(|(k, cgroup)| {
                let ports = [port(k, 0).to_string(), port(k, 1).to_string()];
                let worker = probe(
                    &["worker", &ports[0], &ports[1]],
                    Placement::new(cgroup, &netns),
                );
                worker.expect("listening");
                worker
            })
            .collect();
        Self {
            workers,
            cgroups,
            netns,
            enforcer,
        }
    }

    fn path(&self, k: usize) -> CgroupPath {
        self.cgroups[k].scope()
    }
}

/// A rule as generated: indices into the tables above.
#[derive(Debug, Clone)]
struct RuleSpec {
    cgroup: Option<usize>,
    remote: Vec<usize>,
    remote_ports: Vec<usize>,
    local_ports: Vec<usize>,
    direction: Option<bool>,
    mode: usize,
}

/// client worker, server worker, which of the server's ports, which target address.
type ConnSpec = (usize, usize, usize, usize);

fn rule_spec() -> impl Strategy<Value = RuleSpec> {
    let few = |n: usize| prop::collection::vec(0..n, 0..=2);
    (
        prop::option::of(0..CGROUPS.len()),
        few(CIDRS.len()),
        few(PORTS.len()),
        few(PORTS.len()),
        prop::option::of(any::<bool>()),
        0..Mode::ALL.len(),
    )
        .prop_map(
            |(cgroup, remote, remote_ports, local_ports, direction, mode)| RuleSpec {
                cgroup,
                remote,
                remote_ports,
                local_ports,
                direction,
                mode,
            },
        )
}

fn case() -> impl Strategy<Value = (Vec<RuleSpec>, usize, Vec<ConnSpec>)> {
    (
        prop::collection::vec(rule_spec(), 0..7),
        0..4usize,
        prop::collection::vec(
            (
                0..CGROUPS.len(),
                0..CGROUPS.len(),
                0..2usize,
                0..TARGETS.len(),
            ),
            1..7,
        ),
    )
}

fn values(idle: u32) -> Values {
    Values {
        idle_secs: idle,
        interval_secs: 5,
        count: 3,
        user_timeout_ms: None,
    }
}

/// The policy of a case: rule `i` sets idle `100 + i`, the default 99.
fn policy(world: &World, rules: &[RuleSpec], scopes: usize) -> Policy {
    let scopes: &[usize] = match scopes {
        0 => &[0],
        1 => &[1],
        2 => &[2, 3],
        _ => &[3],
    };
    let range = |i: &usize| PortRange {
        first: PORTS[*i].0,
        last: PORTS[*i].1,
    };
    Policy {
        scopes: scopes.iter().map(|&k| world.path(k)).collect(),
        default: Action::enforce(values(DEFAULT_IDLE)),
        rules: rules
            .iter()
            .enumerate()
            .map(|(i, spec)| Rule {
                cgroup: spec.cgroup.map(|k| world.path(k)),
                remote: spec
                    .remote
                    .iter()
                    .map(|&c| Cidr::parse(CIDRS[c]).unwrap())
                    .collect(),
                remote_ports: spec.remote_ports.iter().map(range).collect(),
                local_ports: spec.local_ports.iter().map(range).collect(),
                direction: spec.direction.map(Direction::from_outbound),
                ..Rule::new(
                    format!("rule {}", i + 1),
                    Action {
                        mode: Mode::ALL[spec.mode],
                        values: values(100 + u32::try_from(i).unwrap()),
                        lock: false,
                        ends: false,
                    },
                )
            })
            .collect(),
        existing: false,
        annotations: None,
    }
}

/// One end of a real connection: its socket, and the connection as the model sees it.
struct End {
    socket: TcpStream,
    conn: Connection,
}

fn end(fd: OwnedFd, cgroup: CgroupPath, direction: Direction) -> End {
    let socket = TcpStream::from(fd);
    let (local, peer) = (socket.local_addr().unwrap(), socket.peer_addr().unwrap());
    End {
        conn: Connection {
            cgroup,
            direction,
            remote: peer.ip(),
            remote_port: peer.port(),
            local_port: local.port(),
        },
        socket,
    }
}

fn open(world: &mut World, (client, server, which, target): ConnSpec) -> [End; 2] {
    let ip: IpAddr = TARGETS[target].parse().unwrap();
    let addr = std::net::SocketAddr::new(ip, port(server, which));
    world.workers[client].send(&format!("connect {addr}"));
    let (connected, accepted) = if client == server {
        // One process prints both, in either order.
        let [connected, accepted] =
            words_in_any_order(&world.workers[client], ["connected", "accepted"]);
        (connected, accepted)
    } else {
        (
            world.workers[client].expect("connected"),
            world.workers[server].expect("accepted"),
        )
    };
    let client_fd: i32 = connected[0].parse().unwrap();
    assert_eq!(accepted[0], port(server, which).to_string());
    let server_fd: i32 = accepted[1].parse().unwrap();
    [
        end(
            world.workers[client].steal_fd(client_fd),
            world.path(client),
            Direction::Outbound,
        ),
        end(
            world.workers[server].steal_fd(server_fd),
            world.path(server),
            Direction::Inbound,
        ),
    ]
}

/// The next line starting with each of `words`, whatever their order.
fn words_in_any_order<const N: usize>(worker: &Workload, words: [&str; N]) -> [Vec<String>; N] {
    let mut found: [Option<Vec<String>>; N] = std::array::from_fn(|_| None);
    while found.iter().any(Option::is_none) {
        let line = worker
            .try_line_within(keepalive_tests::process::LINE_TIMEOUT)
            .unwrap_or_else(|| panic!("no {words:?} lines from the worker"));
        let mut parts = line.split_whitespace().map(str::to_string);
        let first = parts.next().unwrap_or_default();
        if let Some(i) = words.iter().position(|word| *word == first) {
            found[i] = Some(parts.collect());
        }
    }
    found.map(Option::unwrap)
}

/// Outcome counters of every slot the case's policy uses.
fn counters(world: &World, rules: usize) -> Vec<[u64; Outcome::COUNT as usize]> {
    (0..=u32::try_from(rules).unwrap())
        .map(|slot| world.enforcer.outcomes(slot).unwrap().0)
        .collect()
}

fn check(
    world: &mut World,
    rules: &[RuleSpec],
    scopes: usize,
    conns: &[ConnSpec],
) -> Result<(), TestCaseError> {
    // A clean slate, whatever an earlier (failed) case left: no sockets, no unread lines.
    for worker in &mut world.workers {
        worker.send("close");
        worker.expect("closed");
    }
    let policy = policy(world, rules, scopes);
    world.enforcer.apply(&policy).unwrap();
    let untouched = Keepalive::untouched(&world.netns);
    // Before 6.1 the kernel cannot read keepalive options: fill, cap and audit leave the
    // socket alone and count it failed (what the agent warns of at start).
    let reads = !world.enforcer.lacks(features::READS);
    conns.iter().try_for_each(|&spec| {
        let before = counters(world, rules.len());
        let ends = open(world, spec);
        let after = counters(world, rules.len());
        let mut expected = before;
        for end in &ends {
            let decision = policy.decide(&end.conn);
            let got = Keepalive::of(&end.socket);
            let (want, outcome) = match policy.action(decision) {
                None => (untouched, None),
                Some(action) => match action.mode {
                    Mode::Fill | Mode::Cap | Mode::Audit if !reads => {
                        (untouched, Some(Outcome::Failed))
                    }
                    // Nothing set by the application: fill and cap set the values too.
                    Mode::Enforce | Mode::Fill | Mode::Cap => {
                        (Keepalive::enforced(&action.values), Some(Outcome::Set))
                    }
                    Mode::Exempt => (untouched, Some(Outcome::Exempted)),
                    Mode::Audit => (untouched, Some(Outcome::Audited)),
                },
            };
            prop_assert_eq!(
                got,
                want,
                "{:?} decided by {:?} of {:#?}",
                end.conn,
                decision,
                policy
            );
            if let Some(outcome) = outcome
                && decision != Decision::Outside
            {
                let slot = Policy::slot(decision) as usize;
                expected[slot][outcome as usize] += 1;
            }
        }
        prop_assert_eq!(after, expected, "counters after {:?}", spec);
        Ok(())
    })
}

/// Random policies per run: 256, or `KA_MODEL_CASES`. The kernel-matrix guests run 64 each
/// (`cargo xtask test --kernel`): the program is the same bytecode on every kernel, and each
/// guest proves its kernel verifies and runs it; the host's run explores the 256.
fn cases() -> u32 {
    std::env::var("KA_MODEL_CASES").map_or(256, |cases| {
        cases
            .parse()
            .unwrap_or_else(|_| panic!("KA_MODEL_CASES={cases}: not a number of cases"))
    })
}

#[test]
fn kernel_decisions_on_real_connections_equal_the_reference_model() {
    keepalive_tests::require_host();
    let world = std::cell::RefCell::new(World::new());
    let mut runner = TestRunner::new(Config {
        cases: cases(),
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(
            "proptest-regressions/kernel_model.txt",
        ))),
        ..Config::default()
    });
    let outcome = runner.run(&case(), |(rules, scopes, conns)| {
        check(&mut world.borrow_mut(), &rules, scopes, &conns)
    });
    if let Err(failure) = outcome {
        panic!("{failure}");
    }
}
