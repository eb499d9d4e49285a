//! The probe modes a test drives line by line on standard input: a conversation through a
//! firewall, and workers that open and accept connections on command.

use std::{
    io::{self, BufRead as _, Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    sync::{Arc, Mutex, mpsc},
};

use crate::report;

/// Standard input, one command per line; the process exits when it closes.
fn commands() -> mpsc::Receiver<String> {
    let (sender, receiver) = mpsc::channel();
    std::thread::spawn(move || {
        for line in io::stdin().lock().lines().map_while(Result::ok) {
            if sender.send(line).is_err() {
                break;
            }
        }
        std::process::exit(0);
    });
    receiver
}

/// Echoes what every client sends; "echoed PEER N" per read.
pub(crate) fn echo(addr: SocketAddr) -> io::Result<()> {
    let listener = TcpListener::bind(addr)?;
    let _commands = commands();
    report(&format!("listening {}", listener.local_addr()?.port()));
    loop {
        let (mut stream, peer) = listener.accept()?;
        std::thread::spawn(move || {
            let mut buf = [0u8; 256];
            while let Ok(n) = stream.read(&mut buf) {
                if n == 0 || stream.write_all(&buf[..n]).is_err() {
                    break;
                }
                report(&format!("echoed {peer} {n}"));
            }
        });
    }
}

/// One connection that talks on command: `send WAIT_MS` writes a line and waits up to
/// WAIT_MS for the answer ("reply N", "no-reply", "read-eof" or "read-error ERRNO"). It never
/// calls setsockopt: the wait is a poll(2) timeout, not SO_RCVTIMEO.
pub(crate) fn converse(addr: SocketAddr) -> io::Result<()> {
    let mut stream = TcpStream::connect(addr)?;
    let commands = commands();
    report(&format!(
        "connected {} {}",
        stream.as_raw_fd(),
        stream.local_addr()?
    ));
    for command in commands {
        let Some(wait) = command.strip_prefix("send ") else {
            report(&format!("error unknown command {command:?}"));
            continue;
        };
        let wait_ms: i32 = crate::number(wait)?;
        stream.write_all(b"ping\n")?;
        report(&match readable(&stream, wait_ms) {
            Ok(false) => "no-reply".to_string(),
            Ok(true) => {
                let mut buf = [0u8; 64];
                match stream.read(&mut buf) {
                    Ok(0) => "read-eof".to_string(),
                    Ok(n) => format!("reply {n}"),
                    Err(error) => format!("read-error {}", error.raw_os_error().unwrap_or(0)),
                }
            }
            Err(error) => format!("read-error {}", error.raw_os_error().unwrap_or(0)),
        });
    }
    Ok(())
}

/// Whether `stream` has something to read (data, EOF or an error) within `wait_ms`.
fn readable(stream: &TcpStream, wait_ms: i32) -> io::Result<bool> {
    let mut poll = libc::pollfd {
        fd: stream.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one pollfd for a descriptor we own.
    match unsafe { libc::poll(&raw mut poll, 1, wait_ms) } {
        -1 => Err(io::Error::last_os_error()),
        0 => Ok(false),
        _ => Ok(true),
    }
}

/// Listens on `[::]:PORT` for each port (both families: v4 peers arrive IPv4-mapped) and
/// holds every accepted socket ("accepted PORT FD"); on command, `connect ADDR` opens and holds
/// a connection ("connected FD" or "connect-error ERRNO"), `close` closes everything held
/// ("closed").
pub(crate) fn worker(ports: &[u16]) -> io::Result<()> {
    let held: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
    let listeners = ports
        .iter()
        .map(|&port| TcpListener::bind((std::net::Ipv6Addr::UNSPECIFIED, port)))
        .collect::<io::Result<Vec<_>>>()?;
    let commands = commands();
    for (listener, &port) in listeners.into_iter().zip(ports) {
        let held = Arc::clone(&held);
        std::thread::spawn(move || {
            while let Ok((stream, _)) = listener.accept() {
                report(&format!("accepted {port} {}", stream.as_raw_fd()));
                hold(&held, stream);
            }
        });
    }
    report("listening");
    for command in commands {
        if let Some(addr) = command.strip_prefix("connect ") {
            match TcpStream::connect(crate::parse(addr)?) {
                Ok(stream) => {
                    report(&format!("connected {}", stream.as_raw_fd()));
                    hold(&held, stream);
                }
                Err(error) => report(&format!(
                    "connect-error {}",
                    error.raw_os_error().unwrap_or(0)
                )),
            }
        } else if command == "close" {
            held.lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clear();
            report("closed");
        } else {
            report(&format!("error unknown command {command:?}"));
        }
    }
    Ok(())
}

fn hold(held: &Mutex<Vec<TcpStream>>, stream: TcpStream) {
    held.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .push(stream);
}
