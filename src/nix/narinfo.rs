//! The `.narinfo` text format and the signature fingerprint.
//!
//! Pure. [`NarInfo`] renders with `Display` exactly as Nix writes it (field order, `References: `
//! even when empty, final newline) and [`NarInfo::parse`] reads it back, so the two round-trip.

use std::fmt;

/// A narinfo as served. Paths in `references` and `deriver` are basenames.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NarInfo {
    /// Full store path.
    pub store_path: String,
    pub url: String,
    pub compression: String,
    /// `sha256:<nix32>` of the file at `url`, where known.
    pub file_hash: Option<String>,
    pub file_size: Option<u64>,
    /// `sha256:<nix32>`.
    pub nar_hash: String,
    pub nar_size: u64,
    /// Sorted basenames.
    pub references: Vec<String>,
    pub deriver: Option<String>,
    pub system: Option<String>,
    pub sigs: Vec<String>,
    pub ca: Option<String>,
}

/// The string Nix signs for a path: `1;<path>;<narHash>;<narSize>;<refs, full paths, comma-separated>`.
pub fn fingerprint(store_path: &str, nar_hash: &str, nar_size: u64, references: &[String], store_dir: &str) -> String {
    let mut refs: Vec<String> = references.iter().map(|r| format!("{store_dir}/{r}")).collect();
    refs.sort();
    format!("1;{store_path};{nar_hash};{nar_size};{}", refs.join(","))
}

impl NarInfo {
    /// The fingerprint of this narinfo's path, for signing.
    pub fn fingerprint(&self, store_dir: &str) -> String {
        fingerprint(&self.store_path, &self.nar_hash, self.nar_size, &self.references, store_dir)
    }

    /// Parses narinfo text; `None` when a required field (StorePath, URL, NarHash, NarSize) is
    /// missing or a number is malformed. Unknown keys are ignored, as Nix does.
    pub fn parse(text: &str) -> Option<Self> {
        let mut n = NarInfo::default();
        let (mut has_path, mut has_url, mut has_hash) = (false, false, false);
        for line in text.lines() {
            let (key, value) = line.split_once(": ").or_else(|| line.strip_suffix(':').map(|k| (k, "")))?;
            match key {
                "StorePath" => (n.store_path, has_path) = (value.to_owned(), true),
                "URL" => (n.url, has_url) = (value.to_owned(), true),
                "Compression" => n.compression = value.to_owned(),
                "FileHash" => n.file_hash = Some(value.to_owned()),
                "FileSize" => n.file_size = Some(value.parse().ok()?),
                "NarHash" => (n.nar_hash, has_hash) = (value.to_owned(), true),
                "NarSize" => n.nar_size = value.parse().ok()?,
                "References" => n.references = value.split_whitespace().map(str::to_owned).collect(),
                "Deriver" => n.deriver = Some(value.to_owned()),
                "System" => n.system = Some(value.to_owned()),
                "Sig" => n.sigs.push(value.to_owned()),
                "CA" => n.ca = Some(value.to_owned()),
                _ => {}
            }
        }
        (has_path && has_url && has_hash && n.nar_size > 0).then_some(n)
    }
}

impl fmt::Display for NarInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "StorePath: {}", self.store_path)?;
        writeln!(f, "URL: {}", self.url)?;
        writeln!(f, "Compression: {}", self.compression)?;
        if let Some(h) = &self.file_hash {
            writeln!(f, "FileHash: {h}")?;
        }
        if let Some(s) = self.file_size {
            writeln!(f, "FileSize: {s}")?;
        }
        writeln!(f, "NarHash: {}", self.nar_hash)?;
        writeln!(f, "NarSize: {}", self.nar_size)?;
        writeln!(f, "References: {}", self.references.join(" "))?;
        if let Some(d) = &self.deriver {
            writeln!(f, "Deriver: {d}")?;
        }
        if let Some(s) = &self.system {
            writeln!(f, "System: {s}")?;
        }
        for sig in &self.sigs {
            writeln!(f, "Sig: {sig}")?;
        }
        if let Some(ca) = &self.ca {
            writeln!(f, "CA: {ca}")?;
        }
        Ok(())
    }
}
