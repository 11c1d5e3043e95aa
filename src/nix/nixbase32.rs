//! Nix's base-32 encoding ("nixbase32"): its own alphabet, and bytes read from the end.
//!
//! Pure: no I/O. Decoding is total and rejects characters outside the alphabet and input whose
//! top bits overflow the output, as Nix does.

const ALPHABET: &[u8; 32] = b"0123456789abcdfghijklmnpqrsvwxyz";

/// Length of the nixbase32 encoding of `n` bytes.
pub const fn encode_len(n: usize) -> usize {
    if n == 0 { 0 } else { (n * 8 - 1) / 5 + 1 }
}

/// Number of bytes that a nixbase32 string of `len` characters decodes to.
pub const fn decode_len(len: usize) -> usize {
    len * 5 / 8
}

/// Encodes bytes as nixbase32.
pub fn encode(input: &[u8]) -> String {
    let len = encode_len(input.len());
    let mut out = String::with_capacity(len);
    for k in (0..len).rev() {
        let b = k * 5;
        let i = b / 8;
        let j = b % 8;
        let low = input[i] >> j;
        let high = if i + 1 < input.len() && j != 0 { input[i + 1] << (8 - j) } else { 0 };
        out.push(ALPHABET[((low | high) & 31) as usize] as char);
    }
    out
}

fn digit(c: u8) -> Option<u8> {
    ALPHABET.iter().position(|&a| a == c).map(|p| p as u8)
}

/// Decodes nixbase32 into exactly `N` bytes; `None` for a wrong length, a character outside the
/// alphabet, or set bits beyond the last byte.
pub fn decode_fixed<const N: usize>(input: &[u8]) -> Option<[u8; N]> {
    if input.len() != encode_len(N) {
        return None;
    }
    let mut out = [0u8; N];
    for (n, &c) in input.iter().rev().enumerate() {
        let d = digit(c)? as u16;
        let b = n * 5;
        let i = b / 8;
        let j = b % 8;
        let v = d << j;
        out[i] |= (v & 0xff) as u8;
        let carry = (v >> 8) as u8;
        if i + 1 < N {
            out[i + 1] |= carry;
        } else if carry != 0 {
            return None;
        }
    }
    Some(out)
}

/// True when `s` is made of nixbase32 characters only.
pub fn is_valid_chars(s: &[u8]) -> bool {
    s.iter().all(|&c| digit(c).is_some())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths() {
        assert_eq!(encode_len(32), 52);
        assert_eq!(encode_len(20), 32);
        assert_eq!(decode_len(52), 32);
        assert_eq!(decode_len(32), 20);
    }

    #[test]
    fn rejects_overflowing_top_bits() {
        // 52 characters carry 260 bits; the top 4 must be zero for a 32-byte hash.
        let mut s = [b'0'; 52];
        s[0] = b'1';
        assert!(decode_fixed::<32>(&s).is_some());
        s[0] = b'2';
        assert_eq!(decode_fixed::<32>(&s), None);
    }

    #[test]
    fn rejects_bad_chars_and_lengths() {
        assert_eq!(decode_fixed::<20>(b"e0000000000000000000000000000000"), None);
        assert_eq!(decode_fixed::<20>(b"000"), None);
        assert!(!is_valid_chars(b"abcE"));
    }
}
