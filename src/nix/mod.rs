//! Nix's formats, pure: nixbase32, store paths, NAR framing, `.ls` listings, narinfo text,
//! signing keys, URL grammar, daemon-protocol encoding and what a `nix --version` supports.
//!
//! Architecture invariant: nothing in here does I/O or knows about tokio, HTTP, SQL or NATS.
//! Everything else may call it; it calls nothing outside itself.

pub mod closure_diff;
pub mod http_path;
pub mod listing;
pub mod nar;
pub mod narinfo;
pub mod nixbase32;
pub mod signing;
pub mod store_path;
pub mod version;
pub mod wire;

/// Converts a `sha256:<hex>` hash (as the Nix database and daemon store it) to `sha256:<nix32>`.
/// A hash already in nixbase32 is returned as it is. `None` for anything else.
pub fn sha256_to_nix32(hash: &str) -> Option<String> {
    let digest = hash.strip_prefix("sha256:")?;
    match digest.len() {
        64 => {
            let bytes = hex::decode(digest).ok()?;
            Some(format!("sha256:{}", nixbase32::encode(&bytes)))
        }
        52 => nixbase32::decode_fixed::<32>(digest.as_bytes()).map(|_| hash.to_owned()),
        _ => None,
    }
}

/// The raw 32 bytes of a `sha256:<hex|nix32>` hash.
pub fn sha256_bytes(hash: &str) -> Option<[u8; 32]> {
    let nix32 = sha256_to_nix32(hash)?;
    nixbase32::decode_fixed::<32>(nix32.strip_prefix("sha256:")?.as_bytes())
}
