//! Configuration: the TOML file (every key optional, unknown keys refused) → a validated
//! [`Config`]. The only reader of key files.
//!
//! Errors name the file, the key and the reason; key material is never printed.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::builder::config::{BuilderConfig, BuilderSection};
use crate::nix::signing::SecretKey;
use crate::store::{Backend, StoreConfig};
pub use crate::validate::ConfigError;
use crate::validate::in_range;

fn file_err(path: &Path, reason: impl std::fmt::Display) -> ConfigError {
    ConfigError::File { file: path.display().to_string(), reason: reason.to_string() }
}

/// The file as written. Every field has a default, so an empty file is valid.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FileConfig {
    /// `host:port` or `unix:/path`.
    pub bind: String,
    pub priority: u32,
    pub sign_key_paths: Vec<PathBuf>,
    pub store_dir: String,
    pub daemon_socket: PathBuf,
    pub daemon_pool_size: usize,
    pub compression: CompressionSection,
    pub store: StoreSection,
    pub metrics: MetricsSection,
    pub builder: Option<BuilderSection>,
    /// `[fleet]`: without a builder, show the fleet's shared record (JetStream) all the same.
    pub fleet: Option<crate::fleet_view::FleetSection>,
    /// `[bucket]`: push what the builder built to an S3 bucket in Nix's layout.
    pub bucket: Option<crate::bucket::BucketSection>,
    /// The hot-NAR store (absent: none).
    pub nar_cache: Option<NarCacheSection>,
    /// Seconds that in-flight requests and builds get after SIGTERM.
    pub shutdown_grace_seconds: u64,
    /// Client connections served at once.
    pub max_connections: usize,
    /// Seconds a client has to send a request's headers.
    pub header_timeout_seconds: u64,
    /// Seconds a client may read nothing of a response before it is disconnected.
    pub send_timeout_seconds: u64,
    /// NAR downloads (and build logs) streamed at once.
    pub max_nar_streams: usize,
    /// Build log downloads streamed at once.
    pub max_log_streams: usize,
    /// The share of each stream bound one client address may hold (0 < share <= 1).
    pub client_stream_share: f64,
    /// Proxies whose `X-Forwarded-For` names the client.
    pub trusted_proxies: Vec<String>,
    /// Seconds a stream's client must have read nothing before the stream gives its slot to a
    /// new request at a full bound.
    pub stream_min_idle_seconds: u64,
    /// Seconds a request at a full stream bound waits for a slot before it gets 503.
    pub stream_wait_seconds: u64,
    /// Blocking threads that read NARs and logs (apart from database and `.ls` work).
    pub nar_threads: usize,
    /// Where hearth keeps its small state (the fleet record).
    pub state_dir: PathBuf,
}

impl Default for FileConfig {
    fn default() -> Self {
        Self {
            bind: "127.0.0.1:5000".into(),
            priority: 30,
            sign_key_paths: Vec::new(),
            store_dir: "/nix/store".into(),
            daemon_socket: "/nix/var/nix/daemon-socket/socket".into(),
            daemon_pool_size: 16,
            compression: CompressionSection::default(),
            store: StoreSection::default(),
            metrics: MetricsSection::default(),
            builder: None,
            fleet: None,
            bucket: None,
            nar_cache: None,
            shutdown_grace_seconds: 30,
            max_connections: 4096,
            header_timeout_seconds: 30,
            send_timeout_seconds: 60,
            max_nar_streams: 512,
            max_log_streams: 32,
            client_stream_share: 0.25,
            trusted_proxies: vec!["127.0.0.1".into(), "::1".into()],
            stream_min_idle_seconds: 5,
            stream_wait_seconds: 10,
            nar_threads: 32,
            state_dir: "/var/lib/hearth".into(),
        }
    }
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Algorithm {
    None,
    Zstd,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CompressionSection {
    pub algorithm: Algorithm,
    pub level: i32,
    /// Compressed NAR streams at once (each holds an encoder's memory); more get 503.
    pub max_streams: usize,
}

impl Default for CompressionSection {
    fn default() -> Self {
        // Level 1 by measurement (docs/performance.md): 1.9× level 3's speed for an output
        // about a tenth larger, on one core per stream.
        Self { algorithm: Algorithm::None, level: 1, max_streams: 16 }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreSection {
    pub backend: Backend,
    pub db_path: PathBuf,
    pub log_dir: PathBuf,
    /// Where `store_dir` really is, if not at its own path.
    pub real_dir: Option<PathBuf>,
}

impl Default for StoreSection {
    fn default() -> Self {
        Self {
            backend: Backend::Auto,
            db_path: "/nix/var/nix/db/db.sqlite".into(),
            log_dir: "/nix/var/log/nix".into(),
            real_dir: None,
        }
    }
}

/// `[nar_cache]`: hot NARs kept on disk, compressed once.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NarCacheSection {
    pub dir: PathBuf,
    /// `20GiB`, `500MiB`, …
    pub max_size: String,
    /// The zstd level entries are written at (with `compression.algorithm = "zstd"`).
    pub level: i32,
}

impl Default for NarCacheSection {
    fn default() -> Self {
        Self { dir: "/var/cache/hearth/nars".into(), max_size: "20GiB".into(), level: 9 }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsSection {
    /// A separate listener for `/metrics` (the cache's own `/metrics` stays too).
    pub bind: Option<String>,
}

/// Where to listen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BindAddr {
    Tcp(String),
    Unix(PathBuf),
}

impl BindAddr {
    pub fn parse(key: &'static str, s: &str) -> Result<Self, ConfigError> {
        if let Some(path) = s.strip_prefix("unix:") {
            if !path.starts_with('/') {
                return Err(ConfigError::Value { key, reason: "a unix socket path must be absolute".into() });
            }
            return Ok(BindAddr::Unix(path.into()));
        }
        let ok = s.rsplit_once(':').is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
        if !ok {
            return Err(ConfigError::Value { key, reason: format!("`{s}` is not `host:port` or `unix:/path`") });
        }
        Ok(BindAddr::Tcp(s.to_owned()))
    }
}

/// Validated configuration, with keys loaded.
pub struct Config {
    pub bind: BindAddr,
    pub metrics_bind: Option<BindAddr>,
    pub priority: u32,
    pub keys: Vec<SecretKey>,
    pub store: StoreConfig,
    pub zstd_level: Option<i32>,
    pub builder: Option<BuilderConfig>,
    pub fleet: Option<crate::fleet_view::FleetConfig>,
    pub bucket: Option<crate::bucket::BucketConfig>,
    pub shutdown_grace: Duration,
    pub limits: crate::http::ConnLimits,
    pub streams: crate::http::StreamLimits,
    pub state_dir: PathBuf,
}

impl Config {
    /// What `check-config` checked, a line each: keys (by name), listeners, store, limits,
    /// builder repos. Nothing secret: keys by name, repo URLs without credentials.
    pub fn describe(&self) -> Vec<String> {
        let bind = |b: &BindAddr| match b {
            BindAddr::Tcp(a) => a.clone(),
            BindAddr::Unix(p) => format!("unix:{}", p.display()),
        };
        let mut out = vec![format!("cache listens on {}", bind(&self.bind))];
        match &self.metrics_bind {
            Some(m) => out.push(format!("metrics listen on {} (and /metrics on the cache)", bind(m))),
            None => out.push("metrics: /metrics on the cache only".into()),
        }
        if self.keys.is_empty() {
            out.push("signing keys: none (narinfos are unsigned)".into());
        }
        for key in &self.keys {
            out.push(format!("signing key {} (trusted-public-keys = {})", key.name(), key.public_key()));
        }
        out.push(format!(
            "store {} (backend {}), compression {}, priority {}",
            self.store.store_dir,
            format!("{:?}", self.store.backend).to_lowercase(),
            self.zstd_level.map_or("none".to_owned(), |l| format!("zstd level {l}")),
            self.priority
        ));
        if let Some(c) = &self.store.nar_cache {
            out.push(format!("hot NARs in {} (at most {} bytes)", c.dir.display(), c.max_size));
        }
        out.push(format!(
            "limits: {} connections, {} NAR and {} log streams, {} compressed, {} per client",
            self.limits.max_connections,
            self.streams.max_nar_streams,
            self.streams.max_log_streams,
            self.streams.max_zstd_streams,
            self.streams.client_share
        ));
        if let Some(b) = &self.bucket {
            out.push(format!(
                "bucket: s3://{} at {} ({}), zstd level {}",
                b.bucket, b.endpoint, b.region, b.zstd_level
            ));
        }
        if let Some(f) = &self.fleet {
            out.push(format!("fleet: shows the shared record {} at NATS {} (reads only)", f.bucket, f.nats_url));
        }
        match &self.builder {
            None => out.push("builder: off".into()),
            Some(b) => {
                out.push(format!("builder: NATS {}, GC roots in {}", b.nats_url, b.gcroots_dir.display()));
                for r in &b.repos {
                    out.push(format!(
                        "repo {}: {} (deploy branch {})",
                        r.name,
                        crate::builder::job::without_credentials(&r.url),
                        r.branch
                    ));
                }
            }
        }
        out
    }
}

/// The longest text file hearth reads as configuration.
const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// A TOML error without the source line it would quote: the file may hold a secret (a config
/// pointed at a key or seed by mistake), so only the position and the reason are told.
fn toml_error(text: &str, e: &toml::de::Error) -> String {
    let position = e.span().map(|span| {
        let before = &text[..span.start.min(text.len())];
        let line = before.matches('\n').count() + 1;
        let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        // The key is named only when the line is plainly `key = …` with a bare key: a key name
        // is never secret, and anything else (a secret key's `name:base64`) is not quoted.
        let key = text
            .lines()
            .nth(line - 1)
            .and_then(|l| l.split_once('='))
            .map(|(k, _)| k.trim())
            .filter(|k| !k.is_empty() && k.bytes().all(|c| c.is_ascii_alphanumeric() || b"_-.".contains(&c)));
        match key {
            Some(key) => format!("line {line}, column {column} (key `{key}`): "),
            None => format!("line {line}, column {column}: "),
        }
    });
    format!("not a valid hearth config: {}{}", position.unwrap_or_default(), e.message().trim_end())
}

impl Config {
    /// Reads `path` (or uses the defaults) and validates everything, loading key files.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let file: FileConfig = match path {
            Some(p) => {
                let text = crate::regular_file::read_to_string(p, MAX_CONFIG_BYTES).map_err(|e| file_err(p, e))?;
                toml::from_str(&text).map_err(|e| file_err(p, toml_error(&text, &e)))?
            }
            None => FileConfig::default(),
        };
        Self::from_file(file)
    }

    pub fn from_file(file: FileConfig) -> Result<Self, ConfigError> {
        check_limits(&file)?;
        let trusted_proxies = trusted_proxies(&file.trusted_proxies)?;
        let zstd_level = (file.compression.algorithm == Algorithm::Zstd).then_some(file.compression.level);
        let nar_cache = file.nar_cache.as_ref().map(|c| nar_cache(c, zstd_level.is_some())).transpose()?;
        let keys = file.sign_key_paths.iter().map(|p| load_key(p)).collect::<Result<Vec<_>, _>>()?;
        if !file.state_dir.is_absolute() {
            return Err(ConfigError::Value { key: "state_dir", reason: "must be an absolute path".into() });
        }
        let mut builder = file.builder.map(BuilderConfig::from_section).transpose()?;
        let fleet = file.fleet.map(crate::fleet_view::FleetConfig::from_section).transpose()?;
        if fleet.is_some() && builder.is_some() {
            return Err(ConfigError::Value {
                key: "fleet",
                reason: "a [builder] shows the fleet's shared record itself (queue = \"jetstream\"): [fleet] is for a hearth without one".into(),
            });
        }
        let bucket = file.bucket.map(crate::bucket::BucketConfig::from_section).transpose()?;
        if let Some(b) = &bucket {
            if builder.is_none() && !b.read_through {
                return Err(ConfigError::Value {
                    key: "bucket",
                    reason: "a bucket is pushed to by a [builder] or read through (`read_through = true`): set one"
                        .into(),
                });
            }
            if builder.is_some() && keys.is_empty() {
                return Err(ConfigError::Value {
                    key: "bucket",
                    reason: "pushing to a bucket needs a signing key (sign_key_paths)".into(),
                });
            }
        }
        if let Some(b) = builder.as_mut() {
            b.git_cache_dir = file.state_dir.join("git");
        }
        Ok(Self {
            bind: BindAddr::parse("bind", &file.bind)?,
            metrics_bind: file.metrics.bind.as_deref().map(|b| BindAddr::parse("metrics.bind", b)).transpose()?,
            priority: file.priority,
            keys,
            store: StoreConfig {
                real_store_dir: file.store.real_dir.unwrap_or_else(|| PathBuf::from(&file.store_dir)),
                store_dir: file.store_dir,
                db_path: file.store.db_path,
                daemon_socket: file.daemon_socket,
                log_dir: file.store.log_dir,
                pool_size: file.daemon_pool_size,
                backend: file.store.backend,
                nar_threads: file.nar_threads,
                nar_cache,
            },
            zstd_level,
            builder,
            fleet,
            bucket,
            shutdown_grace: Duration::from_secs(file.shutdown_grace_seconds),
            limits: crate::http::ConnLimits {
                max_connections: file.max_connections,
                header_timeout: Duration::from_secs(file.header_timeout_seconds),
                send_timeout: Duration::from_secs(file.send_timeout_seconds),
            },
            streams: crate::http::StreamLimits {
                max_nar_streams: file.max_nar_streams,
                max_zstd_streams: file.compression.max_streams,
                max_log_streams: file.max_log_streams,
                client_share: file.client_stream_share,
                trusted_proxies,
                min_idle: Duration::from_secs(file.stream_min_idle_seconds),
                max_wait: Duration::from_secs(file.stream_wait_seconds),
            },
            state_dir: file.state_dir,
        })
    }
}

/// The numbers and paths of the top level that must be in their range.
fn check_limits(file: &FileConfig) -> Result<(), ConfigError> {
    if !file.store_dir.starts_with('/') || file.store_dir.ends_with('/') || file.store_dir.len() < 2 {
        return Err(ConfigError::Value {
            key: "store_dir",
            reason: "must be an absolute path without a trailing slash".into(),
        });
    }
    in_range("daemon_pool_size", file.daemon_pool_size, 1..=1024)?;
    if !(1..=19).contains(&file.compression.level) {
        return Err(ConfigError::Value { key: "compression.level", reason: "zstd levels are 1 to 19".into() });
    }
    in_range("compression.max_streams", file.compression.max_streams, 1..=4096)?;
    in_range("max_connections", file.max_connections, 1..=1_000_000)?;
    in_range("header_timeout_seconds", file.header_timeout_seconds, 1..=3600)?;
    in_range("send_timeout_seconds", file.send_timeout_seconds, 1..=3600)?;
    in_range("shutdown_grace_seconds", file.shutdown_grace_seconds, 0..=86_400)?;
    in_range("max_nar_streams", file.max_nar_streams, 1..=100_000)?;
    in_range("max_log_streams", file.max_log_streams, 1..=4096)?;
    in_range("stream_min_idle_seconds", file.stream_min_idle_seconds, 1..=3600)?;
    in_range("stream_wait_seconds", file.stream_wait_seconds, 0..=300)?;
    in_range("nar_threads", file.nar_threads, 1..=1024)?;
    if !(file.client_stream_share > 0.0 && file.client_stream_share <= 1.0) {
        return Err(ConfigError::Value {
            key: "client_stream_share",
            reason: "must be a fraction above 0 and at most 1 (0.25: a quarter of each bound)".into(),
        });
    }
    Ok(())
}

/// The proxies whose `X-Forwarded-For` is believed, in canonical form (an IPv4-mapped IPv6
/// address is the IPv4 address).
fn trusted_proxies(addrs: &[String]) -> Result<Vec<std::net::IpAddr>, ConfigError> {
    addrs
        .iter()
        .map(|a| {
            a.parse::<std::net::IpAddr>().map(|ip| ip.to_canonical()).map_err(|_| ConfigError::Value {
                key: "trusted_proxies",
                reason: format!("`{a}` is not an IP address"),
            })
        })
        .collect()
}

/// The `[nar_cache]` section; `zstd`: the cache compresses (so the hot NARs are zstd too).
fn nar_cache(c: &NarCacheSection, zstd: bool) -> Result<crate::store::nar_cache::NarCacheConfig, ConfigError> {
    in_range("nar_cache.level", c.level, 1..=19)?;
    let max_size = crate::store::nar_cache::parse_size(&c.max_size).ok_or_else(|| ConfigError::Value {
        key: "nar_cache.max_size",
        reason: format!("`{}` is not a size like 20GiB (2^30 bytes) or 500MB (10^6 bytes)", c.max_size),
    })?;
    in_range("nar_cache.max_size", max_size, 1 << 20..=1 << 50)?;
    if !c.dir.is_absolute() {
        return Err(ConfigError::Value { key: "nar_cache.dir", reason: "must be an absolute path".into() });
    }
    // It is made at startup if missing; anything but a directory there is a mistake.
    if fs::symlink_metadata(&c.dir).is_ok_and(|m| !m.is_dir()) {
        return Err(ConfigError::Value {
            key: "nar_cache.dir",
            reason: format!("{} exists and is not a directory", c.dir.display()),
        });
    }
    Ok(crate::store::nar_cache::NarCacheConfig { dir: c.dir.clone(), max_size, zstd_level: zstd.then_some(c.level) })
}

/// Reads one secret key file. The error names the file, never its contents.
pub fn load_key(path: &Path) -> Result<SecretKey, ConfigError> {
    let text = crate::regular_file::read_to_string(path, 4096)
        .map_err(|e| file_err(path, format!("cannot read signing key: {e}")))?;
    let key = SecretKey::parse(&text).map_err(|e| file_err(path, format!("not a Nix secret key: {e}")))?;
    crate::regular_file::warn_if_readable_by_others(path, "signing key");
    Ok(key)
}
