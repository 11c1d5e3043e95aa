//! The `[builder]` configuration section, validated: repos, NATS connection and credentials.
//!
//! The NKey seed is read and checked here, once, at startup; it is never logged.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::job::{is_valid_branch, is_valid_name};
use crate::validate::{ConfigError, in_range};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RepoSection {
    pub name: String,
    /// A flake reference, e.g. `git+https://git.example.org/nixos-servers.git`.
    pub url: String,
    #[serde(default = "default_branch")]
    pub branch: String,
}

fn default_branch() -> String {
    "master".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BuilderSection {
    pub nats_url: String,
    pub nkey_seed_file: Option<PathBuf>,
    pub creds_file: Option<PathBuf>,
    pub queue_group: String,
    /// Requests that may wait behind the running one.
    pub queue_size: usize,
    pub build_timeout_seconds: u64,
    /// Each host's last good toplevel is linked at `<gcroots_dir>/<repo>/<host>`.
    pub gcroots_dir: PathBuf,
    /// The `nix` executable.
    pub nix: String,
    /// The shortest interval between two `progress` replies with log lines.
    pub progress_interval_ms: u64,
    /// Good systems kept per host as GC roots (the newest included).
    pub keep_generations: usize,
    /// Nix evaluator processes at once (default: half the cores, at least 1).
    pub eval_workers: Option<usize>,
    /// The most memory (resident) one evaluator may take before it is stopped and its host
    /// fails, e.g. `4GiB` (default: the machine's memory shared by the evaluators, 4 GiB at most,
    /// as nix-eval-jobs' `--max-memory-size`).
    pub eval_max_memory: Option<String>,
    /// Where requests come from: `core` (a queue-group subscription) or `jetstream` (a durable
    /// work queue shared by every builder, and the fleet record in a key-value bucket).
    pub queue: QueueKind,
    /// This builder's name in the shared record (default: the host name).
    pub name: Option<String>,
    /// A running build (and each waiting request) is told about at least this often.
    pub heartbeat_seconds: u64,
    pub jetstream: JetStreamSection,
    pub repos: Vec<RepoSection>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QueueKind {
    Core,
    JetStream,
}

/// `[builder.jetstream]`: the stream, consumer and bucket of `queue = "jetstream"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JetStreamSection {
    pub stream: String,
    pub consumer: String,
    /// A request older than this is dropped from the stream unbuilt.
    pub max_age_seconds: u64,
    /// The stream's size bound; a publish beyond it is refused (so a client hears of it).
    pub max_bytes: u64,
    /// How long a delivered request may go without an acknowledgement before it is delivered
    /// again; a running build says "still working" every third of it.
    pub ack_wait_seconds: u64,
    /// Deliveries of one request before it is answered `failed` and removed.
    pub max_deliver: i64,
    /// The key-value bucket of the fleet record.
    pub bucket: String,
    /// Copies of the stream and bucket in a NATS cluster (1 on a single server).
    pub replicas: usize,
}

impl Default for JetStreamSection {
    fn default() -> Self {
        Self {
            stream: "HEARTH_BUILDS".into(),
            consumer: "hearth-builders".into(),
            max_age_seconds: 86_400,
            max_bytes: 64 << 20,
            ack_wait_seconds: 60,
            max_deliver: 3,
            bucket: "hearth_fleet".into(),
            replicas: 1,
        }
    }
}

impl Default for BuilderSection {
    fn default() -> Self {
        Self {
            nats_url: "nats://127.0.0.1:4222".into(),
            nkey_seed_file: None,
            creds_file: None,
            queue_group: "hearth-builders".into(),
            queue_size: 16,
            build_timeout_seconds: 4 * 3600,
            gcroots_dir: "/nix/var/nix/gcroots/hearth".into(),
            nix: "nix".into(),
            progress_interval_ms: 1000,
            keep_generations: 3,
            eval_workers: None,
            eval_max_memory: None,
            queue: QueueKind::Core,
            name: None,
            heartbeat_seconds: 20,
            jetstream: JetStreamSection::default(),
            repos: Vec::new(),
        }
    }
}

/// How the builder authenticates to NATS.
#[derive(Clone)]
pub enum NatsAuth {
    None,
    /// An NKey seed (`SU…`), already validated.
    NKey(String),
    Creds(PathBuf),
}

impl std::fmt::Debug for NatsAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NatsAuth::None => f.write_str("None"),
            NatsAuth::NKey(_) => f.write_str("NKey(<redacted>)"),
            NatsAuth::Creds(p) => write!(f, "Creds({})", p.display()),
        }
    }
}

impl NatsAuth {
    /// Reads and validates the credentials named by the flags or config.
    pub fn load(nkey_seed_file: Option<&std::path::Path>, creds_file: Option<PathBuf>) -> Result<Self, ConfigError> {
        match (nkey_seed_file, creds_file) {
            (Some(_), Some(_)) => Err(ConfigError::Value {
                key: "builder.nkey_seed_file",
                reason: "set either nkey_seed_file or creds_file, not both".into(),
            }),
            (Some(p), None) => {
                let file = p.display().to_string();
                let seed = crate::regular_file::read_to_string(p, 4096).map_err(|e| ConfigError::File {
                    file: file.clone(),
                    reason: format!("cannot read NKey seed: {e}"),
                })?;
                let seed = seed.trim().to_owned();
                nkeys::KeyPair::from_seed(&seed)
                    .map_err(|_| ConfigError::File { file, reason: "not a valid NKey seed".into() })?;
                crate::regular_file::warn_if_readable_by_others(p, "NKey seed");
                Ok(NatsAuth::NKey(seed))
            }
            (None, Some(c)) => {
                if !c.is_file() {
                    return Err(ConfigError::File {
                        file: c.display().to_string(),
                        reason: "creds file not found".into(),
                    });
                }
                Ok(NatsAuth::Creds(c))
            }
            (None, None) => Ok(NatsAuth::None),
        }
    }

    /// Connect options carrying these credentials.
    pub async fn options(&self) -> std::io::Result<async_nats::ConnectOptions> {
        Ok(match self {
            NatsAuth::None => async_nats::ConnectOptions::new(),
            NatsAuth::NKey(seed) => async_nats::ConnectOptions::with_nkey(seed.clone()),
            NatsAuth::Creds(path) => async_nats::ConnectOptions::with_credentials_file(path.clone()).await?,
        })
    }
}

/// Half the cores, and at least 2 where there are 2 (evaluation ends before the build graph
/// starts, so it never takes a core from a build); each NixOS evaluation is one core and 1–2 GiB.
pub fn default_eval_workers() -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    (cores / 2).max(cores.min(2))
}

/// One evaluator's share of the machine's memory (with room for the rest), 4 GiB at most.
pub fn default_eval_max_memory(eval_workers: usize) -> u64 {
    let total = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| m.lines().find_map(|l| l.strip_prefix("MemTotal:").map(str::to_owned)))
        .and_then(|kib| kib.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(8 << 30, |kib| kib * 1024);
    (total / 2 / eval_workers.max(1) as u64).clamp(256 << 20, 4 << 30)
}

#[derive(Debug, Clone)]
pub struct RepoConfig {
    pub name: String,
    pub url: String,
    pub branch: String,
}

#[derive(Debug, Clone)]
pub struct BuilderConfig {
    pub nats_url: String,
    pub auth: NatsAuth,
    pub queue_group: String,
    pub queue_size: usize,
    pub build_timeout: Duration,
    pub gcroots_dir: PathBuf,
    pub nix: String,
    pub progress_interval: Duration,
    pub keep_generations: usize,
    /// Nix evaluator processes at once.
    pub eval_workers: usize,
    /// Bytes of memory one evaluator may hold.
    pub eval_max_memory: u64,
    pub queue: QueueKind,
    /// This builder's name, as the shared record shows it.
    pub name: String,
    /// The public keys of the cache's signing keys (`trusted-public-keys` form), which its
    /// presence in the shared record names; set by the app, not the config section.
    pub public_keys: Vec<String>,
    pub heartbeat: Duration,
    pub jetstream: JetStreamSection,
    pub repos: Vec<RepoConfig>,
    /// Bare mirrors of the repos' branches, to check that a requested `rev` is on its branch
    /// (`<state_dir>/git`).
    pub git_cache_dir: PathBuf,
}

impl BuilderConfig {
    pub fn from_section(s: BuilderSection) -> Result<Self, ConfigError> {
        let auth = NatsAuth::load(s.nkey_seed_file.as_deref(), s.creds_file)?;
        if s.repos.is_empty() {
            return Err(ConfigError::Value { key: "builder.repos", reason: "configure at least one repo".into() });
        }
        let repos = repos(s.repos)?;
        in_range("builder.queue_size", s.queue_size, 1..=10_000)?;
        in_range("builder.build_timeout_seconds", s.build_timeout_seconds, 1..=7 * 86_400)?;
        in_range("builder.progress_interval_ms", s.progress_interval_ms, 0..=3_600_000)?;
        in_range("builder.keep_generations", s.keep_generations, 1..=1000)?;
        let eval_workers = s.eval_workers.unwrap_or_else(default_eval_workers);
        in_range("builder.eval_workers", eval_workers, 1..=256)?;
        let eval_max_memory = match &s.eval_max_memory {
            Some(text) => crate::store::nar_cache::parse_size(text).ok_or_else(|| ConfigError::Value {
                key: "builder.eval_max_memory",
                reason: format!("`{text}` is not a size like 4GiB"),
            })?,
            None => default_eval_max_memory(eval_workers),
        };
        in_range("builder.eval_max_memory", eval_max_memory, 64 << 20..=1 << 40)?;
        check_jetstream(&s.jetstream)?;
        in_range("builder.heartbeat_seconds", s.heartbeat_seconds, 1..=30)?;
        let name = s.name.unwrap_or_else(|| rustix::system::uname().nodename().to_string_lossy().into_owned());
        if !is_valid_name(&name) {
            return Err(ConfigError::Value { key: "builder.name", reason: format!("`{name}` must be a plain name") });
        }
        if !s.gcroots_dir.is_absolute() {
            return Err(ConfigError::Value { key: "builder.gcroots_dir", reason: "must be an absolute path".into() });
        }
        if !is_valid_name(&s.queue_group) {
            return Err(ConfigError::Value { key: "builder.queue_group", reason: "must be a plain name".into() });
        }
        Ok(Self {
            nats_url: s.nats_url,
            auth,
            queue_group: s.queue_group,
            queue_size: s.queue_size,
            build_timeout: Duration::from_secs(s.build_timeout_seconds),
            gcroots_dir: s.gcroots_dir,
            nix: s.nix,
            progress_interval: Duration::from_millis(s.progress_interval_ms),
            keep_generations: s.keep_generations,
            eval_workers,
            eval_max_memory,
            queue: s.queue,
            name,
            public_keys: Vec::new(),
            heartbeat: Duration::from_secs(s.heartbeat_seconds),
            jetstream: s.jetstream,
            repos,
            git_cache_dir: PathBuf::from("/var/lib/hearth/git"),
        })
    }

    pub fn repo(&self, name: &str) -> Option<&RepoConfig> {
        self.repos.iter().find(|r| r.name == name)
    }
}

/// The configured repos, each checked: a plain name (not `responses`, given once), a safe
/// branch, a flake reference.
fn repos(sections: Vec<RepoSection>) -> Result<Vec<RepoConfig>, ConfigError> {
    let mut repos: Vec<RepoConfig> = Vec::new();
    for r in sections {
        let bad = |key, reason| Err(ConfigError::Value { key, reason });
        if r.name == "responses" {
            return bad("builder.repos.name", "`responses` is reserved: replies go to build.responses.>".into());
        }
        if !is_valid_name(&r.name) {
            return bad("builder.repos.name", format!("`{}` must match ^[A-Za-z0-9][A-Za-z0-9._-]*$", r.name));
        }
        if !is_valid_branch(&r.branch) {
            return bad("builder.repos.branch", format!("`{}` is not a safe branch name", r.branch));
        }
        if r.url.is_empty() || r.url.contains(char::is_whitespace) {
            return bad("builder.repos.url", "must be a flake reference".into());
        }
        if repos.iter().any(|x| x.name == r.name) {
            return bad("builder.repos.name", format!("`{}` is configured twice", r.name));
        }
        repos.push(RepoConfig { name: r.name, url: r.url, branch: r.branch });
    }
    Ok(repos)
}

/// The `[builder.jetstream]` names and bounds.
fn check_jetstream(js: &JetStreamSection) -> Result<(), ConfigError> {
    let plain =
        |name: &str| !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    for (key, name) in [
        ("builder.jetstream.stream", &js.stream),
        ("builder.jetstream.consumer", &js.consumer),
        ("builder.jetstream.bucket", &js.bucket),
    ] {
        if !plain(name) {
            return Err(ConfigError::Value { key, reason: format!("`{name}`: letters, digits, `_` and `-` only") });
        }
    }
    in_range("builder.jetstream.max_age_seconds", js.max_age_seconds, 60..=365 * 86_400)?;
    in_range("builder.jetstream.max_bytes", js.max_bytes, 1 << 20..=1 << 40)?;
    in_range("builder.jetstream.ack_wait_seconds", js.ack_wait_seconds, 3..=3600)?;
    in_range("builder.jetstream.max_deliver", js.max_deliver, 1..=100)?;
    in_range("builder.jetstream.replicas", js.replicas, 1..=5)?;
    Ok(())
}
