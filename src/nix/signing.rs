//! Nix's ed25519 signing keys (`name:base64`) and signatures over narinfo fingerprints.
//!
//! Pure. Key material never implements `Display` or `Debug` beyond its name, so it cannot leak
//! into logs or errors.

use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};

/// Why a key could not be parsed. Never contains key material.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("expected `name:base64`")]
    MissingColon,
    #[error("the key name is empty")]
    EmptyName,
    #[error("the key is not valid base64")]
    Base64,
    #[error("the key has {0} bytes; expected {1}")]
    Length(usize, usize),
    #[error("the public half does not match the secret seed")]
    Mismatch,
}

fn split(s: &str) -> Result<(&str, Vec<u8>), KeyError> {
    let (name, b64) = s.trim().split_once(':').ok_or(KeyError::MissingColon)?;
    if name.is_empty() {
        return Err(KeyError::EmptyName);
    }
    let bytes = STANDARD.decode(b64).map_err(|_| KeyError::Base64)?;
    Ok((name, bytes))
}

/// A named ed25519 secret key as `nix-store --generate-binary-cache-key` writes it. Cloned only
/// to sign in a second place (the bucket's uploader); it has no `Debug`, so it is never printed.
#[derive(Clone)]
pub struct SecretKey {
    name: String,
    key: SigningKey,
}

impl SecretKey {
    /// Parses `name:base64(seed ‖ public)`.
    pub fn parse(s: &str) -> Result<Self, KeyError> {
        let (name, bytes) = split(s)?;
        let bytes: [u8; 64] = bytes.as_slice().try_into().map_err(|_| KeyError::Length(bytes.len(), 64))?;
        let key = SigningKey::from_keypair_bytes(&bytes).map_err(|_| KeyError::Mismatch)?;
        Ok(Self { name: name.to_owned(), key })
    }

    /// Makes a key from a 32-byte seed (from the OS's random source in `hearth keygen`).
    pub fn from_seed(name: &str, seed: &[u8; 32]) -> Self {
        Self { name: name.to_owned(), key: SigningKey::from_bytes(seed) }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `name:<base64 signature>` of `fingerprint`, as a narinfo `Sig` value.
    pub fn sign(&self, fingerprint: &str) -> String {
        let sig = self.key.sign(fingerprint.as_bytes());
        format!("{}:{}", self.name, STANDARD.encode(sig.to_bytes()))
    }

    pub fn public_key(&self) -> PublicKey {
        PublicKey { name: self.name.clone(), key: self.key.verifying_key() }
    }

    /// The secret key file's contents: `name:base64(seed ‖ public)`.
    pub fn to_file_contents(&self) -> String {
        format!("{}:{}", self.name, STANDARD.encode(self.key.to_keypair_bytes()))
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretKey({}, <redacted>)", self.name)
    }
}

/// A named ed25519 public key: `name:base64(32 bytes)`.
#[derive(Clone, PartialEq, Eq)]
pub struct PublicKey {
    name: String,
    key: VerifyingKey,
}

impl PublicKey {
    pub fn parse(s: &str) -> Result<Self, KeyError> {
        let (name, bytes) = split(s)?;
        let bytes: [u8; 32] = bytes.as_slice().try_into().map_err(|_| KeyError::Length(bytes.len(), 32))?;
        let key = VerifyingKey::from_bytes(&bytes).map_err(|_| KeyError::Mismatch)?;
        Ok(Self { name: name.to_owned(), key })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// True when `sig` (`name:base64`) is this key's valid signature of `fingerprint`.
    pub fn verify(&self, fingerprint: &str, sig: &str) -> bool {
        let Some((name, b64)) = sig.split_once(':') else { return false };
        let Ok(bytes) = STANDARD.decode(b64) else { return false };
        let Ok(bytes) = <[u8; 64]>::try_from(bytes.as_slice()) else { return false };
        name == self.name && self.key.verify(fingerprint.as_bytes(), &Signature::from_bytes(&bytes)).is_ok()
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.name, STANDARD.encode(self.key.as_bytes()))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_malformed_keys() {
        assert_eq!(SecretKey::parse("nocolon").unwrap_err(), KeyError::MissingColon);
        assert_eq!(SecretKey::parse(":AAAA").unwrap_err(), KeyError::EmptyName);
        assert_eq!(SecretKey::parse("k:!!!").unwrap_err(), KeyError::Base64);
        assert_eq!(SecretKey::parse("k:AAAA").unwrap_err(), KeyError::Length(3, 64));
        let mismatched = format!("k:{}", STANDARD.encode([1u8; 64]));
        assert_eq!(SecretKey::parse(&mismatched).unwrap_err(), KeyError::Mismatch);
    }

    #[test]
    fn debug_never_shows_the_secret() {
        let key = SecretKey::from_seed("k-1", &[7; 32]);
        let file = key.to_file_contents();
        let secret_b64 = file.split_once(':').unwrap().1;
        assert!(!format!("{key:?}").contains(secret_b64));
        let again = SecretKey::parse(&file).unwrap();
        assert!(key.public_key().verify("fp", &again.sign("fp")));
        assert!(!key.public_key().verify("other", &again.sign("fp")));
    }
}
