//! A plain TCP workload for the integration tests: it never calls setsockopt, so whatever
//! keepalive its sockets have, the kernel side of the agent gave them.
//!
//! ```text
//! ka-probe listen ADDR          -> "listening PORT", then "accepted FD PEER" per connection
//! ka-probe connect ADDR         -> "connected FD LOCAL"
//! ka-probe connect ADDR --read  -> "connected FD LOCAL", then blocks in read(2) and reports
//!                                  "read-error ERRNO", "read-eof" or "read-data N"
//! ka-probe loop ADDR COUNT       -> listens on ADDR, then COUNT times connects to itself,
//!                                  accepts and closes both ends; "looped COUNT NANOS"
//! ka-probe sink ADDR             -> "listening PORT", then accepts and closes, forever
//! ka-probe dial ADDR COUNT       -> COUNT times connects to ADDR and closes; "dialed COUNT NANOS"
//! ka-probe watch ADDR IDLE       -> "listening PORT", then connects to itself until a client
//!                                  socket has TCP_KEEPIDLE = IDLE; "seen MONOTONIC_NS"
//! ka-probe tally ADDR COUNT [RATE] -> "listening PORT", then COUNT connections to itself (at
//!                                  most RATE per second); reads both ends back and prints one
//!                                  "tally KEEPALIVE IDLE INTVL CNT N" line per distinct
//!                                  combination, then "tallied COUNT"
//! ka-probe hold ADDR COUNT       -> COUNT connections to itself, both ends kept open (the
//!                                  soft descriptor limit raised to the hard one); "holding COUNT"
//! ka-probe echo ADDR             -> "listening PORT", then echoes every client ("echoed PEER N")
//! ka-probe converse ADDR         -> "connected FD LOCAL"; each "send WAIT_MS" on stdin writes a
//!                                  line and reports "reply N", "no-reply", "read-eof" or
//!                                  "read-error ERRNO"
//! ka-probe worker PORT...        -> listens on [::]:PORT each ("listening"), reports
//!                                  "accepted PORT FD"; stdin "connect ADDR" -> "connected FD",
//!                                  "close" -> "closed"
//! ```
//! Sockets stay open until standard input reaches end of file; then the probe exits.
//! With `KA_PROBE_KEEPALIVE=IDLE,INTERVAL,COUNT`, `loop`, `sink` and `dial` set keepalive on
//! each connection end themselves, as an application changed to do it would.
#![expect(
    clippy::print_stdout,
    reason = "stdout is the probe's report to the test"
)]

mod interactive;

use std::{
    io::{self, BufRead as _, Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::{AsFd as _, AsRawFd as _},
    process::ExitCode,
};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let result = match args.as_slice() {
        ["listen", addr] => parse(addr).and_then(listen),
        ["connect", addr] => parse(addr).and_then(|addr| connect(addr, false)),
        ["connect", addr, "--read"] => parse(addr).and_then(|addr| connect(addr, true)),
        ["loop", addr, count] => parse(addr).and_then(|addr| connect_loop(addr, number(count)?)),
        ["sink", addr] => parse(addr).and_then(sink),
        ["chatter", addr, count] => parse(addr).and_then(|addr| chatter(addr, number(count)?)),
        ["dial", addr, count] => parse(addr).and_then(|addr| dial(addr, number(count)?)),
        ["watch", addr, idle] => parse(addr).and_then(|addr| watch(addr, number(idle)?)),
        ["tally", addr, count] => parse(addr).and_then(|addr| tally(addr, number(count)?, None)),
        ["tally", addr, count, rate] => {
            parse(addr).and_then(|addr| tally(addr, number(count)?, Some(number(rate)?)))
        }
        ["hold", addr, count] => parse(addr).and_then(|addr| hold(addr, number(count)?)),
        ["echo", addr] => parse(addr).and_then(interactive::echo),
        ["converse", addr] => parse(addr).and_then(interactive::converse),
        ["worker", ports @ ..] if !ports.is_empty() => ports
            .iter()
            .map(|port| number(port))
            .collect::<io::Result<Vec<u16>>>()
            .and_then(|ports| interactive::worker(&ports)),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "usage: ka-probe listen ADDR | connect ADDR [--read] | loop ADDR COUNT | chatter ADDR \
             COUNT | sink ADDR \
             | dial ADDR COUNT | watch ADDR IDLE | tally ADDR COUNT [RATE] | hold ADDR COUNT | echo ADDR \
             | converse ADDR | worker PORT...",
        )),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            println!("error {error}");
            ExitCode::FAILURE
        }
    }
}

fn parse(addr: &str) -> io::Result<SocketAddr> {
    addr.parse()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("{addr}: {e}")))
}

fn number<T: std::str::FromStr<Err: std::fmt::Display>>(text: &str) -> io::Result<T> {
    text.parse()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("{text}: {e}")))
}

fn report(line: &str) {
    let mut out = io::stdout().lock();
    // A test that stopped reading is gone; nothing useful to do with the error.
    let _ignored = writeln!(out, "{line}").and_then(|()| out.flush());
}

/// Exits the process when standard input closes (the test dropped its handle).
fn exit_on_stdin_eof() {
    std::thread::spawn(|| {
        let mut sink = String::new();
        while io::stdin().lock().read_line(&mut sink).is_ok_and(|n| n > 0) {
            sink.clear();
        }
        std::process::exit(0);
    });
}

fn listen(addr: SocketAddr) -> io::Result<()> {
    let listener = TcpListener::bind(addr)?;
    exit_on_stdin_eof();
    report(&format!("listening {}", listener.local_addr()?.port()));
    let mut open = Vec::new();
    loop {
        let (stream, peer) = listener.accept()?;
        report(&format!("accepted {} {peer}", stream.as_raw_fd()));
        open.push(stream);
    }
}

fn connect(addr: SocketAddr, read: bool) -> io::Result<()> {
    let mut stream = TcpStream::connect(addr)?;
    exit_on_stdin_eof();
    report(&format!(
        "connected {} {}",
        stream.as_raw_fd(),
        stream.local_addr()?
    ));
    if read {
        let mut buf = [0u8; 64];
        match stream.read(&mut buf) {
            Ok(0) => report("read-eof"),
            Ok(n) => report(&format!("read-data {n}")),
            Err(error) => report(&format!("read-error {}", error.raw_os_error().unwrap_or(0))),
        }
    }
    loop {
        std::thread::park();
    }
}

/// The connection-rate workload: connect, accept, close both, as fast as one thread can.
fn connect_loop(addr: SocketAddr, count: u64) -> io::Result<()> {
    let listener = TcpListener::bind(addr)?;
    let target = listener.local_addr()?;
    let start = std::time::Instant::now();
    for _ in 0..count {
        let client = TcpStream::connect(target)?;
        app_keepalive(&client)?;
        let (server, _) = listener.accept()?;
        app_keepalive(&server)?;
        // The server closes first, so TIME_WAIT lands on the server's side and the client's
        // ephemeral ports do not run out over a long run.
        drop(server);
        drop(client);
    }
    report(&format!("looped {count} {}", start.elapsed().as_nanos()));
    Ok(())
}

/// One connection to itself carrying `count` one-byte requests and answers, then closed.
fn chatter(addr: SocketAddr, count: u64) -> io::Result<()> {
    let listener = TcpListener::bind(addr)?;
    let mut client = TcpStream::connect(listener.local_addr()?)?;
    let (mut server, _) = listener.accept()?;
    client.set_nodelay(true)?;
    server.set_nodelay(true)?;
    let start = std::time::Instant::now();
    let mut byte = [0u8; 1];
    for _ in 0..count {
        client.write_all(b"?")?;
        server.read_exact(&mut byte)?;
        server.write_all(&byte)?;
        client.read_exact(&mut byte)?;
    }
    report(&format!("chattered {count} {}", start.elapsed().as_nanos()));
    Ok(())
}

/// The server side of `dial`: accept and close, as fast as it can (it closes first).
fn sink(addr: SocketAddr) -> io::Result<()> {
    let listener = TcpListener::bind(addr)?;
    exit_on_stdin_eof();
    report(&format!("listening {}", listener.local_addr()?.port()));
    loop {
        let (server, _) = listener.accept()?;
        app_keepalive(&server)?;
        drop(server);
    }
}

/// The client side of a connection-rate run across a link: connect and close.
fn dial(addr: SocketAddr, count: u64) -> io::Result<()> {
    let start = std::time::Instant::now();
    let mut eof = [0u8; 1];
    for _ in 0..count {
        let mut stream = TcpStream::connect(addr)?;
        app_keepalive(&stream)?;
        // Wait for the sink's close (EOF, 0 bytes), so TIME_WAIT lands on its side (see
        // `connect_loop`). The sink never writes.
        let _eof: usize = stream.read(&mut eof)?;
    }
    report(&format!("dialed {count} {}", start.elapsed().as_nanos()));
    Ok(())
}

/// Connects to itself until a client socket carries `idle`, then reports when (CLOCK_MONOTONIC,
/// the clock `Instant` uses, so the test can compare it with its own readings).
fn watch(addr: SocketAddr, idle: i32) -> io::Result<()> {
    let listener = TcpListener::bind(addr)?;
    exit_on_stdin_eof();
    report(&format!("listening {}", listener.local_addr()?.port()));
    let target = listener.local_addr()?;
    loop {
        let client = TcpStream::connect(target)?;
        let seen = monotonic_ns();
        drop(listener.accept()?);
        if keepidle(&client)? == idle {
            report(&format!("seen {seen}"));
            return Ok(());
        }
    }
}

/// The four options set by the application, if `KA_PROBE_KEEPALIVE` asks for it: the TCP
/// values first and `SO_KEEPALIVE` last, as the agent's program does.
fn app_keepalive(stream: &TcpStream) -> io::Result<()> {
    static VALUES: std::sync::OnceLock<Option<[i32; 3]>> = std::sync::OnceLock::new();
    let values = VALUES.get_or_init(|| {
        let text = std::env::var("KA_PROBE_KEEPALIVE").ok()?;
        let numbers: Vec<i32> = text
            .split(',')
            .map(|n| n.trim().parse().ok())
            .collect::<Option<_>>()?;
        numbers.try_into().ok()
    });
    let Some([idle, interval, count]) = *values else {
        return Ok(());
    };
    let set =
        |level, name, value| keepalive_agent::sockopt::set_int(stream.as_fd(), level, name, value);
    set(libc::SOL_TCP, libc::TCP_KEEPIDLE, idle)?;
    set(libc::SOL_TCP, libc::TCP_KEEPINTVL, interval)?;
    set(libc::SOL_TCP, libc::TCP_KEEPCNT, count)?;
    set(libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1)
}

fn keepidle(stream: &TcpStream) -> io::Result<i32> {
    option(stream, libc::SOL_TCP, libc::TCP_KEEPIDLE)
}

fn option(stream: &TcpStream, level: i32, name: i32) -> io::Result<i32> {
    keepalive_agent::sockopt::get_int(stream.as_fd(), level, name)
}

/// Many connections held open, for sweeps of existing connections.
fn hold(addr: SocketAddr, count: u64) -> io::Result<()> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain system calls with a struct of the right type.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut limit) != 0 {
            return Err(io::Error::last_os_error());
        }
        limit.rlim_cur = limit.rlim_max;
        if libc::setrlimit(libc::RLIMIT_NOFILE, &raw const limit) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    let listener = TcpListener::bind(addr)?;
    exit_on_stdin_eof();
    let target = listener.local_addr()?;
    let mut open = Vec::new();
    for _ in 0..count {
        let client = TcpStream::connect(target)?;
        let (server, _) = listener.accept()?;
        open.push((client, server));
    }
    report(&format!("holding {}", open.len()));
    loop {
        std::thread::park();
    }
}

/// Many connections, each end read back: which combinations of values occurred, how often.
/// With a `rate`, connection `i` starts no earlier than `i / rate` seconds in: the load spreads
/// over a known time, so the test has time to do things to the agent meanwhile.
fn tally(addr: SocketAddr, count: u64, rate: Option<u64>) -> io::Result<()> {
    let listener = TcpListener::bind(addr)?;
    exit_on_stdin_eof();
    report(&format!("listening {}", listener.local_addr()?.port()));
    let target = listener.local_addr()?;
    let mut seen: std::collections::BTreeMap<[i32; 4], u64> = std::collections::BTreeMap::new();
    let start = std::time::Instant::now();
    for i in 0..count {
        if let Some(rate) = rate.filter(|&rate| rate > 0) {
            let due = std::time::Duration::from_micros(i * 1_000_000 / rate);
            if let Some(ahead) = due.checked_sub(start.elapsed()) {
                std::thread::sleep(ahead);
            }
        }
        let client = TcpStream::connect(target)?;
        let (server, _) = listener.accept()?;
        for end in [&client, &server] {
            let values = [
                option(end, libc::SOL_SOCKET, libc::SO_KEEPALIVE)?,
                option(end, libc::SOL_TCP, libc::TCP_KEEPIDLE)?,
                option(end, libc::SOL_TCP, libc::TCP_KEEPINTVL)?,
                option(end, libc::SOL_TCP, libc::TCP_KEEPCNT)?,
            ];
            *seen.entry(values).or_default() += 1;
        }
        drop(server);
        drop(client);
    }
    for ([keepalive, idle, interval, count], n) in seen {
        report(&format!("tally {keepalive} {idle} {interval} {count} {n}"));
    }
    report(&format!("tallied {count}"));
    Ok(())
}

fn monotonic_ns() -> u128 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut now) };
    u128::try_from(now.tv_sec).unwrap_or(0) * 1_000_000_000
        + u128::try_from(now.tv_nsec).unwrap_or(0)
}
