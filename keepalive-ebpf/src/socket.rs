//! `enforce::Socket` over bpf_getsockopt / bpf_setsockopt.

use core::ffi::c_void;

use aya_ebpf::{
    helpers::generated::{bpf_getsockopt, bpf_setsockopt},
    programs::SockOpsContext,
};
use keepalive_common::enforce::Socket;

/// `sizeof(int)`: every option we touch is an int.
const OPTLEN: i32 = 4;

/// The socket of a sock_ops callback.
pub(crate) struct SockOpsSocket {
    ctx: *mut c_void,
}

impl SockOpsSocket {
    #[inline(always)]
    pub(crate) fn new(ctx: &SockOpsContext) -> Self {
        Self {
            ctx: ctx.ops.cast(),
        }
    }
}

impl Socket for SockOpsSocket {
    #[inline(always)]
    fn get(&mut self, level: i32, name: i32) -> Result<i32, i64> {
        let mut value: i32 = 0;
        // SAFETY: the program's context and a 4-byte stack slot.
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
        // SAFETY: the program's context and a 4-byte stack slot.
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
