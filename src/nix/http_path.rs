//! The cache's URL grammar: a request path segment → a typed request, or `None`.
//!
//! Pure and total: every function returns `None` for anything malformed, so garbage never reaches
//! the store. The HTTP layer maps `None` to 400.

use super::nixbase32;
use super::store_path::{StorePath, StorePathHash};

/// A sha256 NAR hash given in a NAR URL (nixbase32, 52 characters).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NarHashPart(pub [u8; 32]);

/// How a NAR is asked to be encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NarEncoding {
    None,
    Zstd,
}

/// A parsed `nar/…` request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NarRequest {
    pub nar_hash: NarHashPart,
    /// The store path hash, from `?hash=` or the nix-serve `<store hash>-<narhash>` shape.
    pub store_hash: Option<StorePathHash>,
    pub encoding: NarEncoding,
}

/// Parses `<hash>.narinfo`.
pub fn parse_narinfo(file: &str) -> Option<StorePathHash> {
    StorePathHash::parse(file.strip_suffix(".narinfo")?.as_bytes())
}

/// Parses `<hash>.ls`.
pub fn parse_listing(file: &str) -> Option<StorePathHash> {
    StorePathHash::parse(file.strip_suffix(".ls")?.as_bytes())
}

fn parse_nar_hash(s: &str) -> Option<NarHashPart> {
    nixbase32::decode_fixed::<32>(s.as_bytes()).map(NarHashPart)
}

/// Parses the file segment of `nar/<file>` and its `hash` query parameter. Accepts
/// `<narhash>.nar[.zst]` (harmonia's shape, with `?hash=<store hash>`) and
/// `<store hash>-<narhash>.nar[.zst]` (nix-serve's shape).
pub fn parse_nar(file: &str, query_hash: Option<&str>) -> Option<NarRequest> {
    let (stem, encoding) = if let Some(stem) = file.strip_suffix(".nar.zst") {
        (stem, NarEncoding::Zstd)
    } else {
        (file.strip_suffix(".nar")?, NarEncoding::None)
    };
    let (store_hash, nar_hash) = match stem.split_once('-') {
        Some((store, nar)) => (Some(StorePathHash::parse(store.as_bytes())?), parse_nar_hash(nar)?),
        None => (None, parse_nar_hash(stem)?),
    };
    let store_hash = match (store_hash, query_hash) {
        (Some(h), None) => Some(h),
        (None, Some(q)) => Some(StorePathHash::parse(q.as_bytes())?),
        (None, None) => None,
        // Two store hashes that disagree are malformed; equal ones are harmless.
        (Some(h), Some(q)) => {
            if StorePathHash::parse(q.as_bytes())? != h {
                return None;
            }
            Some(h)
        }
    };
    Some(NarRequest { nar_hash, store_hash, encoding })
}

/// Parses the `/log/<drv basename>` segment: a store path whose name ends in `.drv`.
pub fn parse_log(file: &str) -> Option<StorePath> {
    let path = StorePath::from_basename(file)?;
    path.name().ends_with(".drv").then_some(path)
}

/// A CA realisation id `sha256:<64 hex>!<output name>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RealisationId {
    pub drv_hash: String,
    pub output: String,
}

/// Parses `/realisations/<id>.doi`.
pub fn parse_realisation(file: &str) -> Option<RealisationId> {
    let id = file.strip_suffix(".doi")?;
    let (hash, output) = id.split_once('!')?;
    let hex = hash.strip_prefix("sha256:")?;
    let valid_hex = hex.len() == 64 && hex.bytes().all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c));
    let valid_output = !output.is_empty()
        && output.len() <= 211
        && output.bytes().all(|c| c.is_ascii_alphanumeric() || b"+-._?=".contains(&c))
        && !output.starts_with('.');
    (valid_hex && valid_output).then(|| RealisationId { drv_hash: hash.to_owned(), output: output.to_owned() })
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: &str = "2xr781z591fm9c9jchvf8389sr8qsszk";
    const N: &str = "14ml5q1qvx7y3d0n2d1n0j2gdj4s0z54pfj6iwvgnn038ipybsgd";

    #[test]
    fn narinfo_and_ls() {
        assert!(parse_narinfo(&format!("{H}.narinfo")).is_some());
        assert!(parse_narinfo(&format!("{H}.narinfox")).is_none());
        assert!(parse_narinfo("../etc/passwd.narinfo").is_none());
        assert!(parse_listing(&format!("{H}.ls")).is_some());
    }

    #[test]
    fn nar_shapes() {
        let r = parse_nar(&format!("{N}.nar"), Some(H)).unwrap();
        assert_eq!(r.store_hash.unwrap().as_str(), H);
        assert_eq!(r.encoding, NarEncoding::None);
        let r = parse_nar(&format!("{H}-{N}.nar.zst"), None).unwrap();
        assert_eq!(r.encoding, NarEncoding::Zstd);
        assert!(parse_nar(&format!("{N}.nar"), None).unwrap().store_hash.is_none());
        assert!(parse_nar(&format!("{N}.nar.xz"), None).is_none());
        assert!(parse_nar(&format!("{N}.nar"), Some("zz")).is_none());
        assert!(parse_nar(&format!("{H}-{N}.nar"), Some("0000000000000000000000000000000z")).is_none());
    }

    #[test]
    fn realisations() {
        let id = "sha256:d90edad6f8b8aed569327494c39628279efb54f474c3d7b403842c10d8d42865!out";
        assert_eq!(parse_realisation(&format!("{id}.doi")).unwrap().output, "out");
        assert!(parse_realisation("sha256:xyz!out.doi").is_none());
        assert!(parse_realisation(&format!("{}!../x.doi", &id[..71])).is_none());
    }

    #[test]
    fn logs() {
        assert!(parse_log("39bvdmldxycprsns8aq5n5r1lffhp1mx-withrefs.drv").is_some());
        assert!(parse_log("39bvdmldxycprsns8aq5n5r1lffhp1mx-withrefs").is_none());
    }
}
