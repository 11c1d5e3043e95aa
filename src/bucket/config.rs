//! The `[bucket]` section: an S3 bucket in Nix's own URL form, credentials from files (never in
//! the TOML, never logged), the zstd level and upload concurrency.

use std::path::PathBuf;

use serde::Deserialize;

use crate::validate::{ConfigError, in_range};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BucketSection {
    /// `s3://<bucket>?endpoint=<url>&region=<region>`, as a client's `substituters` holds it.
    pub url: String,
    pub access_key_id_file: PathBuf,
    pub secret_access_key_file: PathBuf,
    #[serde(default = "default_level")]
    pub zstd_level: i32,
    #[serde(default = "default_concurrency")]
    pub upload_concurrency: usize,
    /// Answer paths that are not in the local store from the bucket.
    #[serde(default)]
    pub read_through: bool,
    /// With `read_through`: where clients can fetch the bucket's objects themselves (its
    /// website endpoint or a CDN in front of it); a NAR not in the local store is then a
    /// redirect there instead of streamed through this process.
    #[serde(default)]
    pub public_url: Option<String>,
    /// With `read_through`: where NARs fetched from the bucket are kept, so that each is
    /// fetched once however many hosts pull it (default `<state_dir>/bucket-nars`).
    #[serde(default)]
    pub read_cache_dir: Option<PathBuf>,
    /// Their bound on disk; `"0"` keeps none (every request streams from the bucket).
    #[serde(default = "default_read_cache_size")]
    pub read_cache_size: String,
}

fn default_read_cache_size() -> String {
    "10GiB".into()
}

fn default_level() -> i32 {
    3
}

fn default_concurrency() -> usize {
    4
}

/// The bucket, validated, its credentials read.
#[derive(Clone)]
pub struct BucketConfig {
    pub bucket: String,
    /// `http(s)://host:port`.
    pub endpoint: String,
    pub region: String,
    pub access_key_id: String,
    pub secret_access_key: String,
    pub zstd_level: i32,
    pub upload_concurrency: usize,
    pub read_through: bool,
    /// `http(s)://…` without a trailing slash.
    pub public_url: Option<String>,
    pub read_cache_dir: Option<PathBuf>,
    /// Bytes; 0 for no read cache.
    pub read_cache_size: u64,
}

impl std::fmt::Debug for BucketConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BucketConfig")
            .field("bucket", &self.bucket)
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("credentials", &"<redacted>")
            .finish()
    }
}

/// The parts of `s3://bucket?endpoint=…&region=…&scheme=…` (Nix's form: `endpoint` may be a
/// bare `host:port`, with `scheme` saying http or https).
pub fn parse_url(url: &str) -> Result<(String, String, String), String> {
    let rest = url.strip_prefix("s3://").ok_or("must start with s3://")?;
    let (bucket, query) = rest.split_once('?').unwrap_or((rest, ""));
    let valid = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.';
    if bucket.len() < 3 || bucket.len() > 63 || !bucket.chars().all(valid) {
        return Err(format!("`{bucket}` is not an S3 bucket name"));
    }
    let (mut endpoint, mut region, mut scheme) = (None, "us-east-1".to_owned(), "https".to_owned());
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match k {
            "endpoint" => endpoint = Some(v.to_owned()),
            "region" => region = v.to_owned(),
            "scheme" => scheme = v.to_owned(),
            // Nix's own knobs (profile, compression, …) mean nothing to the uploader.
            _ => {}
        }
    }
    let endpoint = endpoint.ok_or("needs `endpoint=`: hearth does not guess an S3 host")?;
    let endpoint = if endpoint.starts_with("http://") || endpoint.starts_with("https://") {
        endpoint
    } else if scheme == "http" || scheme == "https" {
        format!("{scheme}://{endpoint}")
    } else {
        return Err(format!("scheme `{scheme}` is neither http nor https"));
    };
    Ok((bucket.to_owned(), endpoint.trim_end_matches('/').to_owned(), region))
}

impl BucketConfig {
    pub fn from_section(s: BucketSection) -> Result<Self, ConfigError> {
        let (bucket, endpoint, region) =
            parse_url(&s.url).map_err(|reason| ConfigError::Value { key: "bucket.url", reason })?;
        let read = |p: &std::path::Path| -> Result<String, ConfigError> {
            let text = crate::regular_file::read_to_string(p, 4096).map_err(|e| ConfigError::File {
                file: p.display().to_string(),
                reason: format!("cannot read an S3 credential: {e}"),
            })?;
            crate::regular_file::warn_if_readable_by_others(p, "S3 credential");
            Ok(text.trim().to_owned())
        };
        let access_key_id = read(&s.access_key_id_file)?;
        let secret_access_key = read(&s.secret_access_key_file)?;
        in_range("bucket.zstd_level", s.zstd_level, 1..=19)?;
        in_range("bucket.upload_concurrency", s.upload_concurrency, 1..=64)?;
        let public_url = s.public_url.map(|u| parse_public_url(&u)).transpose()?;
        if public_url.is_some() && !s.read_through {
            return Err(ConfigError::Value {
                key: "bucket.public_url",
                reason: "only means something with `read_through = true`".into(),
            });
        }
        Ok(Self {
            bucket,
            endpoint,
            region,
            access_key_id,
            secret_access_key,
            zstd_level: s.zstd_level,
            upload_concurrency: s.upload_concurrency,
            read_through: s.read_through,
            public_url,
            read_cache_size: crate::store::nar_cache::parse_size(&s.read_cache_size).ok_or_else(|| {
                ConfigError::Value { key: "bucket.read_cache_size", reason: "not a size like 10GiB".into() }
            })?,
            read_cache_dir: s.read_cache_dir,
        })
    }
}

/// An absolute http(s) URL that can prefix a `Location` header.
fn parse_public_url(url: &str) -> Result<String, ConfigError> {
    let reason = |r: &str| ConfigError::Value { key: "bucket.public_url", reason: r.to_owned() };
    let rest = url.strip_prefix("http://").or_else(|| url.strip_prefix("https://"));
    let rest = rest.ok_or_else(|| reason("must start with http:// or https://"))?;
    let host = rest.split('/').next().unwrap_or("");
    if host.is_empty() || !url.bytes().all(|b| b.is_ascii_graphic()) || url.contains(['?', '#']) {
        return Err(reason("must be an absolute URL with a host, no query and no fragment"));
    }
    Ok(url.trim_end_matches('/').to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nix_s3_urls_are_read_as_nix_reads_them() {
        let (b, e, r) = parse_url("s3://hearth?endpoint=http://127.0.0.1:3900&region=garage").unwrap();
        assert_eq!((b.as_str(), e.as_str(), r.as_str()), ("hearth", "http://127.0.0.1:3900", "garage"));
        let (_, e, r) = parse_url("s3://nix-cache?endpoint=s3.example.org:9000&scheme=http").unwrap();
        assert_eq!((e.as_str(), r.as_str()), ("http://s3.example.org:9000", "us-east-1"));
        assert_eq!(parse_public_url("http://hearth.web.localhost:3902/").unwrap(), "http://hearth.web.localhost:3902");
        for bad in ["ftp://x", "http://", "https://a b", "http://h/?x", "/relative"] {
            assert!(parse_public_url(bad).is_err(), "{bad}");
        }
        for bad in ["http://x", "s3://", "s3://UP?endpoint=h", "s3://ok-name", "s3://abc?endpoint=h&scheme=ftp"] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
    }
}
