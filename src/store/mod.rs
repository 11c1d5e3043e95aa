//! The store: where path info, NARs, logs and realisations come from.
//!
//! Architecture invariant: this is the only code that knows about the Nix database, the daemon
//! socket and the store's directories on disk. It knows nothing of HTTP or NATS. A path that is
//! not in the store is `Ok(None)`, never an error.

pub mod daemon;
pub mod db;
pub mod nar_cache;
pub(crate) mod nar_fs;
pub mod nar_reader;
pub mod nar_stream;
mod temp_roots;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::nix::store_path::{StorePath, StorePathHash};
use crate::nix::{listing::ListingNode, sha256_to_nix32};

pub use daemon::DaemonError;
pub use temp_roots::TempRoot;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The daemon cannot be reached right now; the client should retry.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    #[error("nix database: {0}")]
    Database(String),
    /// Path info or a file on disk that does not make sense.
    #[error("store data: {0}")]
    Corrupt(String),
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
}

impl From<DaemonError> for StoreError {
    fn from(e: DaemonError) -> Self {
        match e {
            DaemonError::Connect(_) | DaemonError::Io(_) | DaemonError::Timeout => {
                StoreError::Unavailable(e.to_string())
            }
            DaemonError::Protocol(_) | DaemonError::Remote(_) => StoreError::Corrupt(e.to_string()),
        }
    }
}

/// What the store knows of one valid path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathInfo {
    pub path: StorePath,
    /// `sha256:<nix32>`.
    pub nar_hash: String,
    pub nar_size: u64,
    /// Sorted basenames.
    pub references: Vec<String>,
    /// Basename of the deriver, if known.
    pub deriver: Option<String>,
    pub sigs: Vec<String>,
    pub ca: Option<String>,
}

impl PathInfo {
    /// This path's narinfo for a file at `url` (`compression`, with its hash and size where
    /// known), unsigned.
    pub fn narinfo(
        &self,
        store_dir: &str,
        url: String,
        compression: &str,
        file: Option<(String, u64)>,
    ) -> crate::nix::narinfo::NarInfo {
        let (file_hash, file_size) = file.map_or((None, None), |(h, s)| (Some(h), Some(s)));
        crate::nix::narinfo::NarInfo {
            store_path: self.path.to_absolute(store_dir),
            url,
            compression: compression.to_owned(),
            file_hash,
            file_size,
            nar_hash: self.nar_hash.clone(),
            nar_size: self.nar_size,
            references: self.references.clone(),
            deriver: self.deriver.clone(),
            system: None,
            sigs: Vec::new(),
            ca: self.ca.clone(),
        }
    }
}

/// Where path info is read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// The database if it can be opened read-only, else the daemon.
    Auto,
    Db,
    Daemon,
}

/// Settings the store needs.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// The logical store directory (`/nix/store`), as it appears in paths.
    pub store_dir: String,
    /// Where that directory really is on this machine (usually the same).
    pub real_store_dir: PathBuf,
    pub db_path: PathBuf,
    pub daemon_socket: PathBuf,
    pub log_dir: PathBuf,
    pub pool_size: usize,
    pub backend: Backend,
    /// Blocking threads that produce NAR (and log) chunks, apart from tokio's shared pool.
    pub nar_threads: usize,
    /// The hot-NAR store, if configured.
    pub nar_cache: Option<nar_cache::NarCacheConfig>,
}

/// Path infos kept in memory at most.
const INFO_CACHE_ENTRIES: usize = 100_000;

/// Which file a store path is on disk: a path deleted and made again is another file.
#[derive(Clone, Copy, PartialEq, Eq)]
struct DiskId {
    dev: u64,
    ino: u64,
    ctime: i64,
    ctime_nsec: i64,
}

impl DiskId {
    fn of(path: &Path) -> Option<Self> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::symlink_metadata(path).ok()?;
        Some(Self { dev: m.dev(), ino: m.ino(), ctime: m.ctime(), ctime_nsec: m.ctime_nsec() })
    }
}

/// What a backend (database or daemon) reports about a valid path, before it is validated:
/// full paths, a `sha256:` hash in base16 or nixbase32, empty strings for "none".
struct Reported<'a, R> {
    full: &'a str,
    hash: &'a str,
    nar_size: Option<u64>,
    references: R,
    deriver: &'a str,
    sigs: Vec<String>,
    ca: &'a str,
}

/// Store access shared by the HTTP cache and the builder.
pub struct Store {
    config: StoreConfig,
    db: Option<db::Db>,
    pool: daemon::Pool,
    roots: Arc<temp_roots::TempRoots>,
    nars: Arc<nar_stream::NarPool>,
    nar_cache: Option<Arc<nar_cache::NarCache>>,
    /// Path info of valid paths, keyed by hash part. Store paths are immutable, so an entry stays
    /// right while the same file is on disk; that is checked (one `lstat`) on every hit. Misses
    /// are never cached: a path built a moment ago is found at once.
    infos: quick_cache::sync::Cache<StorePathHash, (DiskId, Arc<PathInfo>)>,
}

fn basename(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

impl Store {
    /// Opens the store. With `Backend::Db` an unreadable database is an error; with `Auto` it
    /// falls back to the daemon with a warning.
    pub fn open(config: StoreConfig) -> Result<Self, StoreError> {
        let db = match config.backend {
            Backend::Daemon => None,
            Backend::Db => Some(db::Db::open(&config.db_path)?),
            Backend::Auto => match db::Db::open(&config.db_path) {
                Ok(db) => Some(db),
                Err(e) => {
                    tracing::warn!(db = %config.db_path.display(), err = %e, "cannot read the Nix database; using the daemon");
                    None
                }
            },
        };
        let pool = daemon::Pool::new(config.daemon_socket.clone(), config.pool_size);
        let roots = Arc::new(temp_roots::TempRoots::new(config.daemon_socket.clone()));
        let nars = Arc::new(nar_stream::NarPool::new(config.nar_threads)?);
        let nar_cache = match &config.nar_cache {
            Some(c) => Some(Arc::new(nar_cache::NarCache::open(c.clone(), roots.clone())?)),
            None => None,
        };
        let infos = quick_cache::sync::Cache::new(INFO_CACHE_ENTRIES);
        Ok(Self { config, db, pool, roots, nars, nar_cache, infos })
    }

    pub fn store_dir(&self) -> &str {
        &self.config.store_dir
    }

    /// Which backend answers path-info queries.
    pub fn backend_name(&self) -> &'static str {
        if self.db.is_some() { "db" } else { "daemon" }
    }

    pub fn pool(&self) -> &daemon::Pool {
        &self.pool
    }

    /// Daemon connections opened for temp roots so far.
    pub fn temp_root_connections(&self) -> u64 {
        self.roots.connections_opened()
    }

    /// Where a store path lives on disk.
    pub fn disk_path(&self, path: &StorePath) -> PathBuf {
        self.config.real_store_dir.join(path.to_string())
    }

    /// Path info for the valid path with this hash part.
    pub async fn path_info(&self, hash: StorePathHash) -> Result<Option<Arc<PathInfo>>, StoreError> {
        if let Some((id, info)) = self.infos.get(&hash) {
            if DiskId::of(&self.disk_path(&info.path)) == Some(id) {
                return Ok(Some(info));
            }
            self.infos.remove(&hash);
        }
        let info = match &self.db {
            Some(db) => match db.by_hash_part(&self.config.store_dir, hash.as_str()).await? {
                Some(row) => Some(self.info_from_row(row)?),
                None => None,
            },
            None => self.path_info_from_daemon(hash).await?,
        };
        let Some(info) = info.map(Arc::new) else { return Ok(None) };
        if let Some(id) = DiskId::of(&self.disk_path(&info.path)) {
            self.infos.insert(hash, (id, info.clone()));
        }
        Ok(Some(info))
    }

    /// Validated path info from what a backend reported.
    fn assemble<'a>(&self, r: Reported<'a, impl Iterator<Item = &'a str>>) -> Result<PathInfo, StoreError> {
        let Reported { full, hash, nar_size, references, deriver, sigs, ca } = r;
        let corrupt = |what: &str| StoreError::Corrupt(format!("{what} of {full}"));
        let path = StorePath::from_absolute(&self.config.store_dir, full).ok_or_else(|| corrupt("path"))?;
        let nar_hash = sha256_to_nix32(hash).ok_or_else(|| corrupt("NAR hash"))?;
        let nar_size = nar_size.filter(|&n| n > 0).ok_or_else(|| corrupt("NAR size"))?;
        let mut references: Vec<String> = references.map(|r| basename(r).to_owned()).collect();
        references.sort();
        Ok(PathInfo {
            path,
            nar_hash,
            nar_size,
            references,
            deriver: (!deriver.is_empty()).then(|| basename(deriver).to_owned()),
            sigs,
            ca: (!ca.is_empty()).then(|| ca.to_owned()),
        })
    }

    fn info_from_row(&self, row: db::DbRow) -> Result<PathInfo, StoreError> {
        self.assemble(Reported {
            full: &row.path,
            hash: &row.hash,
            nar_size: row.nar_size.and_then(|n| u64::try_from(n).ok()),
            references: row.references.as_deref().unwrap_or("").split_whitespace(),
            deriver: row.deriver.as_deref().unwrap_or(""),
            sigs: row.sigs.as_deref().unwrap_or("").split_whitespace().map(str::to_owned).collect(),
            ca: row.ca.as_deref().unwrap_or(""),
        })
    }

    async fn path_info_from_daemon(&self, hash: StorePathHash) -> Result<Option<PathInfo>, StoreError> {
        let hash_str = hash.as_str().to_owned();
        let found = self
            .pool
            .run(move |conn| {
                let hash_str = hash_str.clone();
                Box::pin(async move {
                    let Some(path) = conn.query_path_from_hash_part(&hash_str).await? else { return Ok(None) };
                    Ok(conn.query_path_info(&path).await?.map(|info| (path, info)))
                })
            })
            .await?;
        let Some((full, info)) = found else { return Ok(None) };
        // The daemon sends the NAR hash as bare base16.
        let hash =
            if info.nar_hash.contains(':') { info.nar_hash.clone() } else { format!("sha256:{}", info.nar_hash) };
        self.assemble(Reported {
            full: &full,
            hash: &hash,
            nar_size: Some(info.nar_size),
            references: info.references.iter().map(String::as_str),
            deriver: &info.deriver,
            sigs: info.sigs,
            ca: &info.ca,
        })
        .map(Some)
    }

    /// Points the symlink `link` at the store path `target` (replacing what it pointed to, in one
    /// rename) and registers it with the daemon as an indirect GC root, so it holds wherever
    /// `link` lives. `target` must be valid; the caller holds it meanwhile.
    pub async fn add_indirect_root(&self, target: &StorePath, link: &std::path::Path) -> Result<(), StoreError> {
        let full = target.to_absolute(&self.config.store_dir);
        let link = link.to_owned();
        let link_for_fs = link.clone();
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            let link = link_for_fs;
            if let Some(dir) = link.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let name = link.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let tmp = link.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
            let _ = std::fs::remove_file(&tmp);
            std::os::unix::fs::symlink(&full, &tmp)?;
            std::fs::rename(&tmp, &link)
        })
        .await
        .map_err(|e| StoreError::Io(std::io::Error::other(e)))??;
        let link =
            link.to_str().ok_or_else(|| StoreError::Corrupt("a GC root path that is not UTF-8".into()))?.to_owned();
        self.pool
            .run(move |conn| {
                let link = link.clone();
                Box::pin(async move { conn.add_indirect_root(&link).await })
            })
            .await?;
        Ok(())
    }

    /// Protects `path` from garbage collection until the returned guard is dropped, then checks
    /// that it is still on disk (it may have been collected before the root was added).
    pub async fn hold(&self, path: &StorePath) -> Result<Option<TempRoot>, StoreError> {
        let full = path.to_absolute(&self.config.store_dir);
        let root = self.roots.add(&full).await?;
        match tokio::fs::symlink_metadata(self.disk_path(path)).await {
            Ok(_) => Ok(Some(root)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// The closure of `path`: it and everything it references, directly or not. `None` if
    /// `path` is not valid; a reference that vanished meanwhile is skipped.
    pub async fn closure(&self, path: &StorePath) -> Result<Option<Vec<Arc<PathInfo>>>, StoreError> {
        let Some(root) = self.path_info(path.hash()).await? else { return Ok(None) };
        let mut seen = std::collections::HashSet::from([root.path.hash()]);
        let mut todo = vec![root];
        let mut out = Vec::new();
        while let Some(info) = todo.pop() {
            for reference in &info.references {
                let Some(r) = StorePath::from_basename(reference) else { continue };
                if seen.insert(r.hash())
                    && let Some(next) = self.path_info(r.hash()).await?
                {
                    todo.push(next);
                }
            }
            out.push(info);
        }
        Ok(Some(out))
    }

    /// The hot-NAR store, if configured.
    pub fn nar_cache(&self) -> Option<&nar_cache::NarCache> {
        self.nar_cache.as_deref()
    }

    /// Queues `infos` for the hot-NAR store (a host's closure, about to be pulled), in the
    /// background; nothing happens without one.
    pub fn cache_nars(&self, infos: &[Arc<PathInfo>]) {
        let Some(cache) = &self.nar_cache else { return };
        for info in infos {
            let full = info.path.to_absolute(&self.config.store_dir);
            cache.enqueue(info.clone(), self.disk_path(&info.path), full);
        }
    }

    /// The bytes `[start, end)` of a hot-NAR entry's file, streamed on the NAR pool.
    /// `None` when the entry's file is gone or damaged: it is dropped, and the caller serves
    /// the NAR from the store instead. The file is opened (and checked) off the async threads,
    /// and its first chunk read there too.
    ///
    /// A whole file is checked against its FileHash as it is sent unless it is unchanged (its
    /// [`nar_cache::Stamp`]) since it was last checked; a range is never checked.
    pub async fn cached_nar_stream<G: Send + Sync + 'static>(
        &self,
        hash: StorePathHash,
        entry: &nar_cache::Entry,
        start: u64,
        end: u64,
        guard: G,
    ) -> Result<Option<nar_stream::NarStream>, StoreError> {
        use std::io::{Read, Seek, SeekFrom};
        let Some(cache) = self.nar_cache.clone() else { return Ok(None) };
        let owned = entry.clone();
        let len = end.saturating_sub(start);
        let whole = start == 0 && end == entry.file_size;
        let primed = tokio::task::spawn_blocking(move || -> Option<std::io::Result<nar_stream::Primed>> {
            let (mut file, stamp) = cache.open_entry(hash, &owned)?;
            Some(if whole && owned.checked != Some(stamp) {
                nar_stream::prime(Box::new(cache.verifying(hash, &owned, file, stamp)), len)
            } else if whole {
                nar_stream::prime_file(file, len)
            } else {
                file.seek(SeekFrom::Start(start)).ok()?;
                nar_stream::prime(Box::new(file.take(len)), len)
            })
        })
        .await
        .map_err(|e| StoreError::Corrupt(format!("cache open task: {e}")))?;
        match primed {
            None => Ok(None),
            // Damaged (dropped, WARN) or unreadable as it was read: served from the store.
            Some(Err(e)) => {
                tracing::warn!(file = %entry.file.display(), err = %e, "cannot read a NAR cache entry; serving from the store");
                Ok(None)
            }
            Some(Ok(primed)) => {
                let what = entry.file.display().to_string();
                Ok(Some(nar_stream::NarStream::from_primed(self.nars.clone(), what, primed, guard)))
            }
        }
    }

    /// The NAR of `path` (held by `guard`, e.g. its temp root, while the stream lives).
    pub fn nar_stream<G: Send + Sync + 'static>(
        &self,
        path: &StorePath,
        encoding: nar_stream::Encoding,
        guard: G,
    ) -> nar_stream::NarStream {
        nar_stream::NarStream::new(self.nars.clone(), self.disk_path(path), encoding, guard)
    }

    /// The `.ls` listing of a path and its NAR size, from metadata alone.
    pub async fn listing(&self, path: &StorePath) -> Result<(ListingNode, u64), StoreError> {
        let disk = self.disk_path(path);
        Ok(tokio::task::spawn_blocking(move || nar_fs::listing(&disk))
            .await
            .map_err(|e| StoreError::Corrupt(format!("listing task: {e}")))??)
    }

    /// The build log of a derivation, decompressed as it is streamed (memory stays bounded
    /// whatever it expands to); `None` if the store has none.
    pub async fn build_log(&self, drv: &StorePath) -> Result<Option<nar_stream::NarStream>, StoreError> {
        let base = drv.to_string();
        let dir = self.config.log_dir.join("drvs").join(&base[..2]);
        let plain = dir.join(&base[2..]);
        let bz2 = dir.join(format!("{}.bz2", &base[2..]));
        let source = tokio::task::spawn_blocking(move || open_log(&plain, &bz2))
            .await
            .map_err(|e| StoreError::Corrupt(format!("log task: {e}")))??;
        Ok(source
            .map(|s| nar_stream::NarStream::from_reader(self.nars.clone(), format!("log {base}"), s, u64::MAX, ())))
    }

    /// The realisation document for a CA derivation output, as Nix's binary caches store it.
    pub async fn realisation(&self, drv_hash: &str, output: &str) -> Result<Option<String>, StoreError> {
        let Some(db) = &self.db else { return Ok(None) };
        let Some((out_path, sigs)) = db.realisation(drv_hash, output).await? else { return Ok(None) };
        let signatures: Vec<&str> = sigs.as_deref().unwrap_or("").split_whitespace().collect();
        let doc = serde_json::json!({
            "dependentRealisations": {},
            "id": format!("{drv_hash}!{output}"),
            "outPath": basename(&out_path),
            "signatures": signatures,
        });
        Ok(Some(doc.to_string()))
    }
}

/// Opens a build log: Nix keeps them bzip2-compressed, or plain.
fn open_log(plain: &Path, bz2: &Path) -> Result<Option<nar_stream::Source>, StoreError> {
    match crate::regular_file::open(bz2) {
        Ok(f) => return Ok(Some(Box::new(bzip2::read::BzDecoder::new(f)))),
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
        Err(_) => {}
    }
    match crate::regular_file::open(plain) {
        Ok(f) => Ok(Some(Box::new(f))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Shared handle.
pub type SharedStore = Arc<Store>;
