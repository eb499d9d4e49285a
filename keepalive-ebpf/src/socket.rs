//! `enforce::Socket` over bpf_getsockopt / bpf_setsockopt, for the sock_ops program (whose
//! context stands for the socket) and the sweep program (a `tcp_sock` pointer from the
//! iterator).

use core::ffi::c_void;

use aya_ebpf::{
    helpers::generated::{bpf_getsockopt, bpf_setsockopt},
    programs::SockOpsContext,
};
use keepalive_common::enforce::Socket;

/// `sizeof(int)`: every option we touch is an int.
const OPTLEN: i32 = 4;

/// A socket as the helpers take it: the first argument of bpf_getsockopt / bpf_setsockopt.
pub(crate) struct HelperSocket {
    ctx: *mut c_void,
}

impl HelperSocket {
    /// The socket of a sock_ops callback.
    #[inline(always)]
    pub(crate) fn sock_ops(ctx: &SockOpsContext) -> Self {
        Self {
            ctx: ctx.ops.cast(),
        }
    }

    /// A socket the TCP iterator visits (from `bpf_skc_to_tcp_sock`, checked non-null).
    #[inline(always)]
    pub(crate) fn tcp_sock(tcp_sock: *mut c_void) -> Self {
        Self { ctx: tcp_sock }
    }
}

impl Socket for HelperSocket {
    #[inline(always)]
    fn get(&mut self, level: i32, name: i32) -> Result<i32, i64> {
        let mut value: i32 = 0;
        // SAFETY: the program's context (or the iterator's socket) and a 4-byte stack slot.
        let ret = unsafe {
            bpf_getsockopt(
                self.ctx,
                level,
                name,
                (&raw mut value).cast::<c_void>(),
                OPTLEN,
            )
        };
        if ret == 0 { Ok(value) } else { Err(ret) }
    }

    #[inline(always)]
    fn set(&mut self, level: i32, name: i32, value: i32) -> Result<(), i64> {
        let mut value = value;
        // SAFETY: the program's context (or the iterator's socket) and a 4-byte stack slot.
        let ret = unsafe {
            bpf_setsockopt(
                self.ctx,
                level,
                name,
                (&raw mut value).cast::<c_void>(),
                OPTLEN,
            )
        };
        if ret == 0 { Ok(()) } else { Err(ret) }
    }
}
