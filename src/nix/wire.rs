//! Nix daemon worker protocol constants and the encoding of requests.
//!
//! Pure: building request bytes and naming the numbers. Reading replies is in `store::daemon`,
//! which owns the socket; it uses [`MAX_STRING_LEN`] and [`MAX_LIST_LEN`] to refuse hostile lengths.

use super::nar::put_str;

pub const WORKER_MAGIC_1: u64 = 0x6e69_7863;
pub const WORKER_MAGIC_2: u64 = 0x6478_696f;

/// The newest protocol we speak (1.38); older daemons negotiate down to their own.
pub const CLIENT_VERSION: u64 = (1 << 8) | 38;
/// The oldest we accept: Nix 2.3.
pub const MIN_VERSION: u64 = (1 << 8) | 21;

pub const STDERR_NEXT: u64 = 0x6f6c_6d67;
pub const STDERR_READ: u64 = 0x6461_7461;
pub const STDERR_WRITE: u64 = 0x6461_7416;
pub const STDERR_LAST: u64 = 0x616c_7473;
pub const STDERR_ERROR: u64 = 0x6378_7470;
pub const STDERR_START_ACTIVITY: u64 = 0x5354_5254;
pub const STDERR_STOP_ACTIVITY: u64 = 0x5354_4f50;
pub const STDERR_RESULT: u64 = 0x5253_4c54;

/// Longest string we accept from the daemon (an error message or a path); more is a protocol error.
pub const MAX_STRING_LEN: u64 = 1 << 20;
/// Most list entries we accept from the daemon (references, signatures).
pub const MAX_LIST_LEN: u64 = 1 << 20;

/// The operations hearth uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u64)]
pub enum Op {
    IsValidPath = 1,
    AddTempRoot = 11,
    AddIndirectRoot = 12,
    QueryPathInfo = 26,
    QueryPathFromHashPart = 29,
}

pub const fn major(v: u64) -> u64 {
    v >> 8
}

pub const fn minor(v: u64) -> u64 {
    v & 0xff
}

/// A request buffer.
#[derive(Default)]
pub struct Request(pub Vec<u8>);

impl Request {
    pub fn op(op: Op) -> Self {
        let mut r = Self::default();
        r.u64(op as u64);
        r
    }

    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }

    pub fn str(&mut self, s: &str) -> &mut Self {
        put_str(&mut self.0, s.as_bytes());
        self
    }

    pub fn strs(&mut self, list: &[String]) -> &mut Self {
        self.u64(list.len() as u64);
        for s in list {
            self.str(s);
        }
        self
    }
}
