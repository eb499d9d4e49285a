//! A plain TCP workload for the integration tests: it never calls setsockopt, so whatever
//! keepalive its sockets have, the kernel side of the agent gave them.
//!
//! ```text
//! ka-probe listen ADDR          -> "listening PORT", then "accepted FD PEER" per connection
//! ka-probe connect ADDR         -> "connected FD LOCAL"
//! ka-probe connect ADDR --read  -> "connected FD LOCAL", then blocks in read(2) and reports
//!                                  "read-error ERRNO", "read-eof" or "read-data N"
//! ```
//! Sockets stay open until standard input reaches end of file; then the probe exits.
#![expect(
    clippy::print_stdout,
    reason = "stdout is the probe's report to the test"
)]

use std::{
    io::{self, BufRead as _, Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    process::ExitCode,
};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let result = match args.as_slice() {
        ["listen", addr] => parse(addr).and_then(listen),
        ["connect", addr] => parse(addr).and_then(|addr| connect(addr, false)),
        ["connect", addr, "--read"] => parse(addr).and_then(|addr| connect(addr, true)),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "usage: ka-probe listen ADDR | connect ADDR [--read]",
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
