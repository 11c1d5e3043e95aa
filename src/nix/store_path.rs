//! Store path hashes and names, valid by construction.
//!
//! Pure: parsing only. A [`StorePathHash`] is the 32-character nixbase32 digest that starts every
//! store path's basename; a [`StorePath`] is a basename `<hash>-<name>` whose name uses only the
//! characters Nix allows, so neither can ever carry `/`, `..` or NUL.

use std::fmt;

use super::nixbase32;

/// Characters in a store path hash part.
pub const HASH_LEN: usize = 32;
/// The longest name Nix accepts after `<hash>-`.
pub const MAX_NAME_LEN: usize = 211;

/// The hash part of a store path: 32 nixbase32 characters (20 bytes).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StorePathHash([u8; HASH_LEN]);

impl StorePathHash {
    /// Parses a hash part; `None` unless it is exactly 32 valid nixbase32 characters that decode.
    pub fn parse(s: &[u8]) -> Option<Self> {
        nixbase32::decode_fixed::<20>(s)?;
        let mut out = [0u8; HASH_LEN];
        out.copy_from_slice(s);
        Some(Self(out))
    }

    pub fn as_str(&self) -> &str {
        // Only nixbase32 ASCII characters are ever stored.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

impl fmt::Display for StorePathHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for StorePathHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StorePathHash({})", self.as_str())
    }
}

/// True for a character Nix allows in a store path name.
fn is_name_char(c: u8) -> bool {
    c.is_ascii_alphanumeric() || b"+-._?=".contains(&c)
}

/// A store path basename `<hash>-<name>`, without the store directory.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StorePath {
    hash: StorePathHash,
    name: String,
}

impl StorePath {
    /// Parses a basename such as `2xr781z591fm9c9jchvf8389sr8qsszk-hello.txt`.
    pub fn from_basename(s: &str) -> Option<Self> {
        let bytes = s.as_bytes();
        if bytes.len() < HASH_LEN + 2 || bytes[HASH_LEN] != b'-' {
            return None;
        }
        let hash = StorePathHash::parse(&bytes[..HASH_LEN])?;
        let name = &s[HASH_LEN + 1..];
        if name.len() > MAX_NAME_LEN || name.starts_with('.') || !name.bytes().all(is_name_char) {
            return None;
        }
        Some(Self { hash, name: name.to_owned() })
    }

    /// Parses a full path `<store_dir>/<basename>`.
    pub fn from_absolute(store_dir: &str, path: &str) -> Option<Self> {
        let rest = path.strip_prefix(store_dir)?.strip_prefix('/')?;
        Self::from_basename(rest)
    }

    pub fn hash(&self) -> StorePathHash {
        self.hash
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The full path under `store_dir`.
    pub fn to_absolute(&self, store_dir: &str) -> String {
        format!("{store_dir}/{self}")
    }
}

impl fmt::Display for StorePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.hash, self.name)
    }
}

impl fmt::Debug for StorePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StorePath({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_valid_paths() {
        let p = StorePath::from_basename("2xr781z591fm9c9jchvf8389sr8qsszk-hello.txt").unwrap();
        assert_eq!(p.name(), "hello.txt");
        assert_eq!(p.hash().as_str(), "2xr781z591fm9c9jchvf8389sr8qsszk");
        let abs = "/nix/store/sah6ys5p5a453b5xrprp9mrssbc61147-withrefs";
        assert_eq!(StorePath::from_absolute("/nix/store", abs).unwrap().to_absolute("/nix/store"), abs);
    }

    #[test]
    fn rejects_hostile_names() {
        let h = "2xr781z591fm9c9jchvf8389sr8qsszk";
        for name in ["", "..", ".hidden", "a/b", "a\0b", "a b", "ä"] {
            assert!(StorePath::from_basename(&format!("{h}-{name}")).is_none(), "{name:?}");
        }
        assert!(StorePath::from_basename(&format!("{h}-{}", "a".repeat(212))).is_none());
        assert!(StorePath::from_basename(&format!("{h}-{}", "a".repeat(211))).is_some());
        assert!(StorePath::from_basename("eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee-x").is_none());
        assert!(StorePath::from_absolute("/nix/store", "/nix/storex/2xr781z591fm9c9jchvf8389sr8qsszk-a").is_none());
    }

    #[test]
    fn hash_parse() {
        assert!(StorePathHash::parse(b"2xr781z591fm9c9jchvf8389sr8qsszk").is_some());
        assert!(StorePathHash::parse(b"2xr781z591fm9c9jchvf8389sr8qssz").is_none());
        assert!(StorePathHash::parse(b"2xr781z591fm9c9jchvf8389sr8qsszu").is_none());
    }
}
