//! The `Range` request header, for resuming NAR downloads.
//!
//! Pure. Only a single `bytes=` range is honoured; anything else is ignored (a full 200 reply),
//! as RFC 9110 allows, except a well-formed range that starts past the end, which is a 416.

/// What to do with a request's `Range` header for a body of `size` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeDecision {
    /// Send everything (no header, or one we ignore).
    Full,
    /// Send bytes `[start, end)` as a 206.
    Partial { start: u64, end: u64 },
    /// 416.
    Unsatisfiable,
}

/// Decides how to answer `header` for a body of `size` bytes.
pub fn decide(header: Option<&[u8]>, size: u64) -> RangeDecision {
    let Some(header) = header else { return RangeDecision::Full };
    let Ok(header) = std::str::from_utf8(header) else { return RangeDecision::Full };
    let Some(spec) = header.trim().strip_prefix("bytes=") else { return RangeDecision::Full };
    if spec.contains(',') {
        return RangeDecision::Full;
    }
    let Some((first, last)) = spec.trim().split_once('-') else { return RangeDecision::Full };
    let parse = |s: &str| -> Option<u64> {
        if s.is_empty() || !s.bytes().all(|c| c.is_ascii_digit()) { None } else { s.parse().ok() }
    };
    match (first.is_empty(), last.is_empty()) {
        // bytes=-N: the last N bytes.
        (true, false) => match parse(last) {
            Some(0) => RangeDecision::Unsatisfiable,
            Some(n) if size > 0 => RangeDecision::Partial { start: size.saturating_sub(n), end: size },
            Some(_) => RangeDecision::Unsatisfiable,
            None => RangeDecision::Full,
        },
        // bytes=A-
        (false, true) => match parse(first) {
            Some(a) if a < size => RangeDecision::Partial { start: a, end: size },
            Some(_) => RangeDecision::Unsatisfiable,
            None => RangeDecision::Full,
        },
        (false, false) => match (parse(first), parse(last)) {
            (Some(a), Some(b)) if a > b => RangeDecision::Full,
            (Some(a), Some(_)) if a >= size => RangeDecision::Unsatisfiable,
            (Some(a), Some(b)) => RangeDecision::Partial { start: a, end: b.saturating_add(1).min(size) },
            _ => RangeDecision::Full,
        },
        (true, true) => RangeDecision::Full,
    }
}

#[cfg(test)]
mod tests {
    use super::RangeDecision::*;
    use super::*;

    #[test]
    fn table() {
        let cases: &[(&str, RangeDecision)] = &[
            ("bytes=0-9", Partial { start: 0, end: 10 }),
            ("bytes=10-", Partial { start: 10, end: 100 }),
            ("bytes=-10", Partial { start: 90, end: 100 }),
            ("bytes=-1000", Partial { start: 0, end: 100 }),
            ("bytes=90-1000", Partial { start: 90, end: 100 }),
            ("bytes=99-99", Partial { start: 99, end: 100 }),
            ("bytes=100-", Unsatisfiable),
            ("bytes=100-200", Unsatisfiable),
            ("bytes=-0", Unsatisfiable),
            ("bytes=9-1", Full),
            ("bytes=0-1,5-6", Full),
            ("items=0-1", Full),
            ("bytes=a-b", Full),
            ("bytes=+1-2", Full),
            ("bytes=-", Full),
            ("bytes=18446744073709551615-", Unsatisfiable),
            ("bytes=99999999999999999999999-", Full),
        ];
        for (h, want) in cases {
            assert_eq!(decide(Some(h.as_bytes()), 100), *want, "{h}");
        }
        assert_eq!(decide(None, 100), Full);
    }
}
