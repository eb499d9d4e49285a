//! One TCP connection between two probe processes, both ends readable from the test.

use std::os::fd::{AsFd as _, BorrowedFd, OwnedFd};

use crate::{Keepalive, Placement, Workload, netns::SsEntry};

/// The `ka-probe` workload binary, beside the test binary's target directory (cargo builds the
/// package's binaries before its integration tests).
pub fn probe_bin() -> std::path::PathBuf {
    crate::target_bin("ka-probe")
}

/// Starts `ka-probe ARGS` in `place`.
pub fn probe(args: &[&str], place: Placement<'_>) -> Workload {
    Workload::spawn(probe_bin(), args, place)
}

/// One connection between a server and a client, each held open by its process.
#[derive(Debug)]
pub struct Connection {
    /// The server's port.
    pub port: String,
    client_fd: OwnedFd,
    server_fd: OwnedFd,
    _processes: [Workload; 2],
}

impl Connection {
    /// Whether an `ss` line is one end of this connection.
    pub fn is_end(&self, entry: &SsEntry) -> bool {
        let suffix = format!(":{}", self.port);
        entry.local.ends_with(&suffix) || entry.peer.ends_with(&suffix)
    }

    /// The client socket's settings, read now.
    pub fn client(&self) -> Keepalive {
        Keepalive::of(&self.client_fd)
    }

    /// The client's socket (the same open file as the client process's descriptor): what
    /// the application itself would set through.
    pub fn client_socket(&self) -> BorrowedFd<'_> {
        self.client_fd.as_fd()
    }

    /// The accepted socket's settings, read now.
    pub fn server(&self) -> Keepalive {
        Keepalive::of(&self.server_fd)
    }
}

/// A server listening on `listen` (port 0: any) and a client connecting to `connect_ip` on its
/// port.
pub fn connect(
    listen: &str,
    connect_ip: &str,
    server: Placement<'_>,
    client: Placement<'_>,
) -> Connection {
    let mut places = [server, client].into_iter();
    Connection::between(
        |args| probe(args, places.next().unwrap_or(client)),
        listen,
        connect_ip,
    )
}

impl Connection {
    /// [`connect`] with the server, then the client, started by `start` (given ka-probe's
    /// arguments): for probes run another way (as another user).
    pub fn between(
        mut start: impl FnMut(&[&str]) -> Workload,
        listen: &str,
        connect_ip: &str,
    ) -> Self {
        let server_process = start(&["listen", listen]);
        let port = server_process.expect("listening").remove(0);
        let target = if connect_ip.contains(':') {
            format!("[{connect_ip}]:{port}")
        } else {
            format!("{connect_ip}:{port}")
        };
        let client_process = start(&["connect", &target]);
        let fd = |words: Vec<String>| -> i32 {
            words[0]
                .parse()
                .unwrap_or_else(|e| panic!("probe printed no descriptor: {e}"))
        };
        let client_fd = fd(client_process.expect("connected"));
        let server_fd = fd(server_process.expect("accepted"));
        Self {
            port,
            client_fd: client_process.steal_fd(client_fd),
            server_fd: server_process.steal_fd(server_fd),
            _processes: [client_process, server_process],
        }
    }
}
