//! Startup and shutdown: builds the store, metrics and listeners once, spawns the cache, the
//! metrics listener and the builder on one `TaskTracker`, and stops them on SIGINT/SIGTERM.
//!
//! No domain logic lives here.

use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::Arc;

use anyhow::Context;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{BindAddr, Config};
use crate::http::{self, AppState, CacheSettings, Listener};
use crate::metrics::Metrics;
use crate::store::Store;

/// Binds `addr`, replacing only a stale unix socket.
pub async fn bind(addr: &BindAddr) -> anyhow::Result<Listener> {
    match addr {
        BindAddr::Tcp(a) => {
            Ok(Listener::Tcp(tokio::net::TcpListener::bind(a).await.with_context(|| format!("cannot bind {a}"))?))
        }
        BindAddr::Unix(p) => {
            remove_stale_socket(p)?;
            Ok(Listener::Unix(
                tokio::net::UnixListener::bind(p).with_context(|| format!("cannot bind unix:{}", p.display()))?,
            ))
        }
    }
}

/// Removes a socket left by an earlier run at `path`; refuses to touch anything else (a file, a
/// directory, or a socket something still listens on).
fn remove_stale_socket(path: &std::path::Path) -> anyhow::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("cannot inspect {}", path.display())),
    };
    if !meta.file_type().is_socket() {
        anyhow::bail!("{} exists and is not a socket; refusing to replace it", path.display());
    }
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        anyhow::bail!("{} is in use by another process", path.display());
    }
    std::fs::remove_file(path).with_context(|| format!("cannot remove stale socket {}", path.display()))
}

/// The listener systemd passed us (socket activation), if any.
fn activated_listener() -> anyhow::Result<Option<Listener>> {
    let pid_matches = std::env::var("LISTEN_PID").ok().and_then(|p| p.parse::<u32>().ok()) == Some(std::process::id());
    let count = std::env::var("LISTEN_FDS").ok().and_then(|n| n.parse::<i32>().ok()).unwrap_or(0);
    if !pid_matches || count < 1 {
        return Ok(None);
    }
    // SAFETY: with LISTEN_PID naming this process, systemd guarantees that fd 3 is an open
    // listening socket passed to us and owned by nobody else in this process.
    #[allow(unsafe_code)]
    let fd = unsafe { OwnedFd::from_raw_fd(3) };
    let unix = std::os::unix::net::UnixListener::from(fd);
    let listener = if unix.local_addr().is_ok() {
        unix.set_nonblocking(true)?;
        Listener::Unix(tokio::net::UnixListener::from_std(unix)?)
    } else {
        let tcp = std::net::TcpListener::from(OwnedFd::from(unix));
        tcp.set_nonblocking(true)?;
        Listener::Tcp(tokio::net::TcpListener::from_std(tcp)?)
    };
    Ok(Some(listener))
}

/// Waits for SIGTERM or SIGINT. The handlers are installed when this is called, so call it
/// before announcing readiness: a signal that arrives right after is then never missed.
fn shutdown_signal() -> anyhow::Result<impl Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = int.recv() => tracing::info!("SIGINT: shutting down"),
        }
    })
}

/// Runs `hearth serve` until a signal.
pub async fn run(config: Config) -> anyhow::Result<()> {
    let signalled = shutdown_signal()?;
    let repos: Vec<String> =
        config.builder.as_ref().map(|b| b.repos.iter().map(|r| r.name.clone()).collect()).unwrap_or_default();
    let metrics = Arc::new(Metrics::new(&repos));
    let store = Arc::new(Store::open(config.store.clone()).context("cannot open the Nix store")?);
    // The fleet record is kept only where a builder fills it.
    let fleet_file = config.builder.as_ref().map(|_| config.state_dir.join("fleet.json"));
    let fleet = Arc::new(crate::fleet::Fleet::load(fleet_file));
    let bucket = open_bucket(&config)?;
    // What the builder builds is pushed; a cache without a builder only reads through.
    let uploader = match (&config.builder, config.bucket.as_ref().zip(bucket.clone())) {
        (Some(_), Some((b, bucket))) => Some(uploader(&config, b, bucket, &store, &metrics)?),
        _ => None,
    };
    let mut state = AppState::new(
        store.clone(),
        config.keys,
        metrics.clone(),
        CacheSettings { priority: config.priority, zstd_level: config.zstd_level },
        config.streams,
        fleet.clone(),
    );
    if let Some(b) = config.bucket.as_ref().filter(|b| b.read_through) {
        read_through(&mut state, b, bucket, &config.state_dir)?;
    }

    let listener = match activated_listener()? {
        Some(l) => l,
        None => bind(&config.bind).await?,
    };
    let cancel = CancellationToken::new();
    let tracker = TaskTracker::new();

    log_serving(&listener.describe(), &state, &store, config.zstd_level);
    tracker
        .spawn(log_errors("cache", http::serve(listener, http::router(state.clone()), config.limits, cancel.clone())));
    if let Some(addr) = &config.metrics_bind {
        let l = bind(addr).await?;
        tracing::info!(listen = %l.describe(), "metrics serving");
        tracker.spawn(log_errors(
            "metrics",
            http::serve(l, http::metrics_router(state.clone()), config.limits, cancel.clone()),
        ));
    }
    if let Some(f) = config.fleet.clone() {
        // Never ends: not tracked, so shutdown does not wait for it.
        tokio::spawn(crate::fleet_view::show(f, fleet.clone()));
    }
    let has_builder = config.builder.is_some();
    if let Some(mut builder) = config.builder {
        builder.public_keys = state.keys.iter().map(|k| k.public_key().to_string()).collect();
        if let Some((u, workers)) = &uploader {
            u.start(*workers);
        }
        let uploader = uploader.as_ref().map(|(u, workers)| (u.clone(), *workers));
        let worker =
            crate::builder::Worker::connect(builder, store.clone(), metrics.clone(), fleet.clone(), uploader).await?;
        tracker.spawn(worker.run(cancel.clone(), config.shutdown_grace));
    }
    tracker.close();
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);

    signalled.await;
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    cancel.cancel();
    // The running build gets the grace; stopping it and saying so may take a little longer.
    let wait = config.shutdown_grace
        + if has_builder { crate::builder::SHUTDOWN_STOP_TIME } else { std::time::Duration::ZERO };
    if tokio::time::timeout(wait, tracker.wait()).await.is_err() {
        tracing::warn!(
            grace_seconds = config.shutdown_grace.as_secs(),
            "tasks still running after the grace period; exiting"
        );
    }
    Ok(())
}

/// The `[bucket]`, if there is one, its multipart uploads journaled under the state directory.
fn open_bucket(config: &Config) -> anyhow::Result<Option<crate::bucket::Bucket>> {
    let journal = crate::bucket::journal_dir(&config.state_dir);
    let open = |b| crate::bucket::Bucket::open(b).map(|b| b.with_journal(journal.clone()));
    config.bucket.as_ref().map(open).transpose().context("cannot set up the S3 bucket")
}

/// The uploader a builder pushes its good systems with, and its upload concurrency.
fn uploader(
    config: &Config,
    b: &crate::bucket::BucketConfig,
    bucket: crate::bucket::Bucket,
    store: &Arc<Store>,
    metrics: &Arc<Metrics>,
) -> anyhow::Result<(Arc<crate::bucket::upload::Uploader>, usize)> {
    let uploader = crate::bucket::upload::Uploader::new(
        bucket,
        store.clone(),
        config.keys.clone(),
        b.zstd_level,
        metrics.clone(),
        &config.state_dir,
    );
    Ok((uploader, b.upload_concurrency))
}

/// A cache that reads through to the bucket: the bucket, and (where NARs pass through this
/// process, not redirected to a public URL) the bounded copies of what it read.
fn read_through(
    state: &mut AppState,
    b: &crate::bucket::BucketConfig,
    bucket: Option<crate::bucket::Bucket>,
    state_dir: &std::path::Path,
) -> anyhow::Result<()> {
    state.bucket = bucket;
    if b.public_url.is_none() && b.read_cache_size > 0 {
        let dir = b.read_cache_dir.clone().unwrap_or_else(|| state_dir.join("bucket-nars"));
        let cache = crate::bucket::read_cache::ReadCache::open(&dir, b.read_cache_size)
            .with_context(|| format!("cannot open the bucket read cache {}", dir.display()))?;
        state.bucket_copies = Some(Arc::new(cache));
    }
    Ok(())
}

/// What the operator reads at startup: where it serves, how, and the keys clients trust.
fn log_serving(listen: &str, state: &AppState, store: &Store, zstd_level: Option<i32>) {
    let compression = match zstd_level {
        Some(level) => format!("zstd level {level}"),
        None => "none".to_owned(),
    };
    tracing::info!(listen = %listen, backend = store.backend_name(), keys = state.keys.len(), %compression, "hearth serving");
    for key in state.keys.iter() {
        tracing::info!(
            key = key.name(),
            "signing narinfos; clients trust it with: trusted-public-keys = {}",
            key.public_key()
        );
    }
    if state.keys.is_empty() && state.bucket.is_some() {
        // What a read-through cache serves from the bucket is signed by the builders that
        // pushed it: clients trust their keys, not one of this cache's.
        tracing::info!(
            "no signing key configured (sign_key_paths): the bucket's paths are served as their builders \
             signed them, so clients trust the builders' keys (trusted-public-keys as every page of the \
             fleet, `hearth check-config` and this log print them once the shared record is read, with \
             [fleet] here); paths of this host's own store are served unsigned"
        );
    } else if state.keys.is_empty() {
        tracing::warn!(
            "no signing key configured (sign_key_paths): narinfos are unsigned, and clients that require \
             signatures (the default) refuse every input-addressed path; make one with `hearth keygen`"
        );
    }
}

async fn log_errors(what: &'static str, fut: impl Future<Output = std::io::Result<()>>) {
    if let Err(e) = fut.await {
        tracing::error!(task = what, err = %e, "task failed");
    }
}

/// `hearth keygen`: writes a new key pair in Nix's format; the secret file is created 0600 and
/// never overwrites an existing file.
/// Makes `file`'s directory if missing (private: the quick start's /var/lib/hearth may not
/// exist yet).
fn make_parent(file: &std::path::Path) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    if let Some(dir) = file.parent().filter(|d| !d.as_os_str().is_empty() && !d.exists()) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
    }
    Ok(())
}

/// Writes a secret to a new file of mode 0600 (never over an existing one).
fn write_secret(file: &std::path::Path, contents: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    make_parent(file)?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(file)
        .with_context(|| format!("cannot create {}", file.display()))?;
    f.write_all(contents.as_bytes())?;
    Ok(())
}

/// The keys a client of the fleet trusts, for `check-config`: this hearth's own and those
/// every builder in the shared record names (where there is one: a JetStream builder, or
/// `[fleet]`); what went wrong reading the record, if it could not be read now.
pub async fn fleet_keys(config: &Config) -> (Vec<String>, Option<String>) {
    let own: Vec<String> = config.keys.iter().map(|k| k.public_key().to_string()).collect();
    let shared = match (&config.builder, &config.fleet) {
        (Some(b), _) if b.queue == crate::builder::config::QueueKind::JetStream => {
            Some((b.nats_url.clone(), b.auth.clone(), b.jetstream.bucket.clone()))
        }
        (_, Some(f)) => Some((f.nats_url.clone(), f.auth.clone(), f.bucket.clone())),
        _ => None,
    };
    let Some((url, auth, bucket)) = shared else { return (own, None) };
    let read = async {
        let options = auth.options().await.map_err(|e| e.to_string())?;
        let client = options.name("hearth-check-config").connect(&url).await.map_err(|e| e.to_string())?;
        let kv = async_nats::jetstream::new(client).get_key_value(&bucket).await.map_err(|e| e.to_string())?;
        Ok::<_, String>(crate::fleet::read_presences(&kv).await)
    };
    match tokio::time::timeout(std::time::Duration::from_secs(5), read).await {
        Ok(Ok(builders)) => (crate::fleet::fleet_keys(own, builders.values()), None),
        Ok(Err(e)) => (own, Some(format!("cannot read the shared record at {url}: {e}"))),
        Err(_) => (own, Some(format!("no answer from {url} within 5 s"))),
    }
}

/// `hearth nkey`: a NATS user NKey; its seed to `seed_file` (0600), its public key printed
/// (what the NATS server's `authorization` names).
pub fn nkey(seed_file: &std::path::Path) -> anyhow::Result<()> {
    let user = nkeys::KeyPair::new_user();
    let seed = user.seed().map_err(|e| anyhow::anyhow!("cannot make an NKey: {e}"))?;
    write_secret(seed_file, &format!("{seed}\n"))?;
    println!("{}", user.public_key());
    Ok(())
}

pub fn keygen(name: &str, secret: &std::path::Path, public: &std::path::Path) -> anyhow::Result<()> {
    if name.is_empty() || name.contains(':') || name.chars().any(char::is_whitespace) {
        anyhow::bail!("a key name must be non-empty, without `:` or spaces");
    }
    make_parent(public)?;
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|e| anyhow::anyhow!("no randomness from the OS: {e}"))?;
    let key = crate::nix::signing::SecretKey::from_seed(name, &seed);
    write_secret(secret, &key.to_file_contents())?;
    std::fs::write(public, key.public_key().to_string())
        .with_context(|| format!("cannot write {}", public.display()))?;
    println!("trusted-public-keys = {}", key.public_key());
    Ok(())
}
