//! How connections end (`ends = true` in the policy): the sock_ops program asks the kernel for
//! the state changes, retransmission timeouts and sends of each connection whose rule says so,
//! sorts each connection's end into an [`End`] counted per rule slot, and reports each failure
//! (a reset or a timeout) as an [`EndEvent`] with how long the connection had been silent
//! before it, and the longest silence it survived (a send after it was answered). A normal
//! close is reported only where the connection survived a silence of at least
//! [`EndOffsets::tracked_silence`].

/// Per-CPU counters indexed by `slot * End::COUNT + end` ([`end_index`]).
pub const ENDS_MAP: &str = "KA_ENDS";
/// Ring buffer of [`EndEvent`]s, one per failure.
pub const END_EVENTS_MAP: &str = "KA_END_EVENTS";
/// Read-only global: the [`EndOffsets`] of the running kernel (all 0: ends are not followed).
pub const END_OFFSETS: &str = "KA_END_OFFSETS";
/// Socket storage: the silences a connection sent after ([`Silences`]).
pub const SILENCES_MAP: &str = "KA_SILENCES";

/// `ECONNRESET`, `EPIPE`, `ECONNABORTED` (`<asm-generic/errno.h>`).
const ECONNRESET: i32 = 104;
const EPIPE: i32 = 32;
const ECONNABORTED: i32 = 103;

/// How a connection ended.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum End {
    /// Closed by either end (FIN), or aborted by its own process (`close` with unread data,
    /// `SO_LINGER` 0, `ss -K`).
    Closed = 0,
    /// A reset came in: from the peer, or from a middlebox that forgot the flow.
    Reset = 1,
    /// Keepalive found the peer gone: probes went unanswered (or TCP_USER_TIMEOUT ran out
    /// while probing).
    Keepalive = 2,
    /// Data went unanswered: retransmissions ran out, or TCP_USER_TIMEOUT.
    Timeout = 3,
}

impl End {
    pub const COUNT: u32 = 4;
    pub const ALL: [Self; Self::COUNT as usize] =
        [Self::Closed, Self::Reset, Self::Keepalive, Self::Timeout];

    pub const fn name(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Reset => "reset",
            Self::Keepalive => "keepalive",
            Self::Timeout => "timeout",
        }
    }

    /// The end of a connection that reaches TCP_CLOSE with `sk_err` = `error`, when no
    /// retransmission timeout expired before (those are [`End::Timeout`], counted at the
    /// expiry). A timer's death sets ETIMEDOUT (or the soft error an ICMP message left): with
    /// retransmissions accounted for, that is the keepalive timer's (the zero-window probe
    /// timer's too, which the kernel does not tell apart).
    pub const fn at_close(error: i32) -> Self {
        match error {
            0 | ECONNABORTED => Self::Closed,
            ECONNRESET | EPIPE => Self::Reset,
            _ => Self::Keepalive,
        }
    }

    /// Whether the end is a failure, reported with its silence.
    pub const fn failed(self) -> bool {
        !matches!(self, Self::Closed)
    }
}

/// Index of a rule slot's end in [`ENDS_MAP`].
#[inline(always)]
pub const fn end_index(slot: u32, end: End) -> u32 {
    slot * End::COUNT + end as u32
}

/// Where the sock_ops program reads a `struct tcp_sock`'s fields in the running kernel (bytes
/// from its start), from the kernel's BTF. `enabled` 0: ends are not followed (the verifier
/// drops that code, so kernels that refuse it still load the program).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EndOffsets {
    pub enabled: u32,
    /// `sk_err` (int).
    pub err: u32,
    /// `rcv_tstamp` (u32 jiffies: the last ACK received).
    pub rcv_tstamp: u32,
    /// `retrans_stamp` (u32 ms of the TCP clock: when the first unanswered segment was sent).
    pub retrans_stamp: u32,
    /// Jiffies (one second's): a send after a shorter silence is not tracked. Middleboxes
    /// forget flows after minutes; a connection pays socket storage only once it idled 1 s.
    pub tracked_silence: u32,
}

/// Per socket, in [`SILENCES_MAP`]: the silences (jiffies since anything came in) the
/// connection sent data after, from the first one of at least
/// [`EndOffsets::tracked_silence`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Silences {
    /// The longest one an answer followed.
    pub survived: u32,
    /// The latest one, and when (low 32 bits of jiffies) its send went out: it survived if
    /// anything came in since.
    pub latest: u32,
    pub latest_at: u32,
    pub _pad: u32,
}

impl Silences {
    /// A send after `silence` at `now` (both jiffies, the send's data is the only thing in
    /// flight): the latest silence was answered, since nothing else is in flight.
    #[inline(always)]
    pub fn sent_after(&mut self, silence: u32, now: u32) {
        if self.latest > self.survived {
            self.survived = self.latest;
        }
        self.latest = silence;
        self.latest_at = now;
    }

    /// The longest silence that was answered, given when the last thing came in
    /// (`rcv_tstamp`, jiffies).
    #[inline(always)]
    pub fn survived_by(&self, received_at: u32) -> u32 {
        #[expect(
            clippy::cast_possible_wrap,
            reason = "the kernel compares u32 jiffies stamps modulo 2^32 the same way"
        )]
        let answered = received_at.wrapping_sub(self.latest_at) as i32 >= 0;
        if answered && self.latest > self.survived {
            self.latest
        } else {
            self.survived
        }
    }
}

/// One failed connection, or a normal close after a tracked silence, as the ring buffer
/// carries it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EndEvent {
    /// The rule's counting slot.
    pub slot: u32,
    /// An [`End`].
    pub end: u32,
    /// The peer, IPv6 or IPv4-mapped, network byte order.
    pub remote: [u8; 16],
    pub remote_port: u16,
    pub local_port: u16,
    /// Jiffies since the last ACK came in.
    pub silent_jiffies: u32,
    /// [`End::Timeout`]: ms since the first unanswered segment was sent (the part of the
    /// silence spent retransmitting); 0 otherwise.
    pub unanswered_ms: u32,
    /// `OUTBOUND` (this host connected) or `INBOUND` (it accepted).
    pub direction: u32,
    /// Jiffies: the longest silence the connection sent data after and had an answer
    /// ([`Silences::survived_by`]); 0: none tracked.
    pub survived_jiffies: u32,
    pub _pad: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_close_is_sorted_by_the_sockets_error() {
        assert_eq!(End::at_close(0), End::Closed);
        assert_eq!(End::at_close(ECONNABORTED), End::Closed);
        assert_eq!(End::at_close(ECONNRESET), End::Reset);
        assert_eq!(End::at_close(EPIPE), End::Reset);
        // ETIMEDOUT, EHOSTUNREACH
        assert_eq!(End::at_close(110), End::Keepalive);
        assert_eq!(End::at_close(113), End::Keepalive);
    }

    #[test]
    fn ends_are_in_order_and_indices_do_not_overlap() {
        for (i, end) in End::ALL.iter().enumerate() {
            assert_eq!(*end as usize, i, "{} is out of order", end.name());
        }
        assert_eq!(end_index(0, End::Timeout), End::COUNT - 1);
        assert_eq!(end_index(1, End::Closed), End::COUNT);
        assert_eq!(size_of::<EndEvent>(), 48);
        assert!(ENDS_MAP.len() <= 15 && END_EVENTS_MAP.len() <= 15 && END_OFFSETS.len() <= 15);
        assert!(SILENCES_MAP.len() <= 15);
    }

    #[test]
    fn a_silence_survived_once_something_came_in_after_its_send() {
        let mut silences = Silences::default();
        silences.sent_after(2_000, 10_000);
        // Nothing came in since the send: not yet survived.
        assert_eq!(silences.survived_by(8_000), 0);
        assert_eq!(silences.survived_by(10_050), 2_000);
        // A later send with nothing in flight: the one before was answered.
        silences.sent_after(6_000, 20_000);
        assert_eq!(silences.survived_by(14_000), 2_000);
        assert_eq!(silences.survived_by(20_000), 6_000);
        // Across the wrap of the 32-bit stamp.
        let mut wrapped = Silences::default();
        wrapped.sent_after(1_500, u32::MAX - 10);
        assert_eq!(wrapped.survived_by(5), 1_500);
        assert_eq!(wrapped.survived_by(u32::MAX - 20), 0);
    }
}
