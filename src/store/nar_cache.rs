//! Hot NARs: a bounded on-disk store of serialized (and, with zstd, compressed) NARs, so that
//! the paths a fleet is about to pull are compressed once instead of once per host.
//!
//! - Filled in the background, one path at a time, on a low-priority thread: after each
//!   successful host build (that host's closure) and for a path asked for a second time.
//! - An entry is published only complete: written to a temporary file while its NAR's sha256 is
//!   checked against the store's NarHash, then renamed. A crash, a full disk or a mismatch leaves
//!   no visible entry and never disturbs serving.
//! - Keyed by store path hash and NarHash, so a path rebuilt differently is never served stale;
//!   the caller looks a path up only after the store said it is valid, so a collected path is a
//!   404 even while its entry is on disk. Least recently used entries go first when the total
//!   passes `max_size`. The index is the directory itself (`<store hash>-<NarHash>-<FileHash>
//!   .nar[.zst]`), read back at startup.
//!
//! A path not yet cached is served as before, never delayed.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use super::PathInfo;
use super::nar_reader::NarReader;
use super::temp_roots::TempRoots;
use crate::nix::nixbase32;
use crate::nix::store_path::StorePathHash;

/// Settings of the hot-NAR store.
#[derive(Debug, Clone)]
pub struct NarCacheConfig {
    pub dir: PathBuf,
    /// Bytes on disk at most.
    pub max_size: u64,
    /// `Some(level)`: entries are zstd at this level (served for `.nar.zst`); `None`: plain NARs.
    pub zstd_level: Option<i32>,
}

/// Parses a size: `4096` bytes; IEC units `KiB`…`PiB` (and Nix's single letters `K`…`P`) are
/// powers of 1024; SI units `kB`/`KB`…`PB` are powers of 1000, exactly as they say.
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "t" | "tib" => 1 << 40,
        "p" | "pib" => 1 << 50,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        "pb" => 1_000_000_000_000_000,
        _ => return None,
    };
    n.checked_mul(mult)
}

/// One published entry.
#[derive(Debug, Clone)]
pub struct Entry {
    pub file: PathBuf,
    /// `sha256:<nix32>` of the NAR.
    pub nar_hash: String,
    /// `sha256:<nix32>` of the file as served.
    pub file_hash: String,
    pub file_size: u64,
    last_used: u64,
    /// Served at least once since it was published.
    served: bool,
    /// The file's identity and change time when its bytes were last checked against its
    /// FileHash (when it was written, or served whole); `None` until then (an entry read back
    /// at startup). A whole file whose stamp still matches is sent without hashing it again.
    pub(super) checked: Option<Stamp>,
}

/// What changes when anything rewrites, replaces, truncates or chmods a file through the
/// filesystem: its device and inode, its size, and its change time (which no user can set).
/// Corruption beneath the filesystem changes none of them (see ARCHITECTURE.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    dev: u64,
    ino: u64,
    size: u64,
    ctime: (i64, i64),
}

impl Stamp {
    pub fn of(meta: &std::fs::Metadata) -> Self {
        use std::os::unix::fs::MetadataExt;
        Self { dev: meta.dev(), ino: meta.ino(), size: meta.len(), ctime: (meta.ctime(), meta.ctime_nsec()) }
    }

    /// Whether a change now would show in the change time: the kernel keeps it in coarse ticks,
    /// so a file changed within [`SETTLE`] of its last change may keep the same stamp (git's
    /// "racily clean" entries). Only a settled stamp may stand for a check.
    fn settled(&self) -> bool {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        let changed = Duration::new(self.ctime.0.max(0).unsigned_abs(), 0);
        now.saturating_sub(changed) > SETTLE
    }
}

/// How old a file's change time must be for its stamp to stand for a check of its bytes.
const SETTLE: Duration = Duration::from_secs(2);

#[derive(Default)]
struct Index {
    entries: HashMap<StorePathHash, Entry>,
    total: u64,
    clock: u64,
}

/// Counters for the metrics (the store knows nothing of Prometheus).
#[derive(Default, Debug)]
pub struct NarCacheStats {
    pub fills: AtomicU64,
    pub fill_failures: AtomicU64,
    /// Microseconds spent filling, in total.
    pub fill_micros: AtomicU64,
    /// Whole sends hashed against their FileHash.
    pub checks: AtomicU64,
    pub evictions: AtomicU64,
}

struct Job {
    info: Arc<PathInfo>,
    disk: PathBuf,
    full: String,
}

/// What the cache and its fill thread share.
struct Inner {
    config: NarCacheConfig,
    index: Mutex<Index>,
    /// Queued or being filled, so nothing is queued twice.
    pending: Mutex<std::collections::HashSet<StorePathHash>>,
    roots: Arc<TempRoots>,
    stats: NarCacheStats,
    /// Paths evicted unused, and when.
    cooldown: quick_cache::sync::Cache<StorePathHash, Instant>,
    /// Told each time a fill ends, well or not.
    filled: tokio::sync::Notify,
}

/// The hot-NAR store.
pub struct NarCache {
    inner: Arc<Inner>,
    /// Paths asked for once while not cached: a second request queues a fill.
    seen: quick_cache::sync::Cache<StorePathHash, ()>,
    /// The fill thread's queue, started with the first fill; dropping it ends the thread.
    worker: OnceLock<std::sync::mpsc::SyncSender<Job>>,
}

/// Fills waiting at most; more are dropped (they are asked for again later).
const QUEUE: usize = 100_000;
/// An entry may take at most this fraction of `max_size` (NarSize before a fill, the file's size
/// after): one path larger than the cache would evict everything, itself included.
const ADMIT_FRACTION: u64 = 8;
/// How long a path whose entry was evicted before anyone was served from it is not filled again.
const COOLDOWN: std::time::Duration = std::time::Duration::from_secs(3600);

fn ext(zstd: bool) -> &'static str {
    if zstd { "nar.zst" } else { "nar" }
}

/// `<store hash>-<nar hash nix32>-<file hash nix32>.<ext>` → its parts.
fn parse_name(name: &str, zstd: bool) -> Option<(StorePathHash, String, String)> {
    let stem = name.strip_suffix(&format!(".{}", ext(zstd)))?;
    let mut parts = stem.split('-');
    let hash = StorePathHash::parse(parts.next()?.as_bytes())?;
    let nar = parts.next().filter(|h| h.len() == 52)?;
    let file = parts.next().filter(|h| h.len() == 52)?;
    if parts.next().is_some() {
        return None;
    }
    Some((hash, format!("sha256:{nar}"), format!("sha256:{file}")))
}

fn nix32(hash: &str) -> &str {
    hash.strip_prefix("sha256:").unwrap_or(hash)
}

impl NarCache {
    /// Opens the directory (creating it), drops leftovers of interrupted fills, and reads the
    /// entries back.
    pub(super) fn open(config: NarCacheConfig, roots: Arc<TempRoots>) -> io::Result<Self> {
        std::fs::create_dir_all(&config.dir)?;
        let zstd = config.zstd_level.is_some();
        let mut found = Vec::new();
        for e in std::fs::read_dir(&config.dir)? {
            let e = e?;
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(".tmp") {
                let _ = std::fs::remove_file(e.path());
                continue;
            }
            let Some((hash, nar_hash, file_hash)) = parse_name(&name, zstd) else { continue };
            // Only regular files of ours, never followed: a link, FIFO or directory planted
            // under an entry's name is skipped.
            let meta = std::fs::symlink_metadata(e.path())?;
            if let Err(why) = check_file(&meta, None) {
                tracing::warn!(file = %e.path().display(), why, "skipping a NAR cache entry");
                continue;
            }
            let mtime = meta.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok());
            found.push((mtime.map_or(0, |d| d.as_secs()), hash, e.path(), nar_hash, file_hash, meta.len()));
        }
        // Oldest first, so the clock orders them by use as well as it can be known.
        found.sort_by_key(|f| f.0);
        let inner = Inner {
            config,
            index: Mutex::default(),
            pending: Mutex::default(),
            roots,
            stats: Default::default(),
            cooldown: quick_cache::sync::Cache::new(10_000),
            filled: tokio::sync::Notify::new(),
        };
        for (_, hash, file, nar_hash, file_hash, file_size) in found {
            let entry = Entry { file, nar_hash, file_hash, file_size, last_used: 0, served: true, checked: None };
            inner.publish(hash, entry);
        }
        Ok(Self { inner: Arc::new(inner), seen: quick_cache::sync::Cache::new(100_000), worker: OnceLock::new() })
    }

    /// Whether entries are zstd (else plain NARs).
    pub fn compressed(&self) -> bool {
        self.inner.config.zstd_level.is_some()
    }

    /// The counters, for the metrics.
    pub fn stats(&self) -> &NarCacheStats {
        &self.inner.stats
    }

    /// The entry for `hash` if it holds exactly the NAR with `nar_hash` (marked as used).
    pub fn get(&self, hash: StorePathHash, nar_hash: &str) -> Option<Entry> {
        let mut index = self.inner.lock();
        index.clock += 1;
        let clock = index.clock;
        let entry = index.entries.get_mut(&hash).filter(|e| e.nar_hash == nar_hash)?;
        entry.last_used = clock;
        entry.served = true;
        Some(entry.clone())
    }

    /// Opens an entry's file to serve it, checking that it is still what was published: a
    /// regular file of ours (opened without following a link or blocking on a FIFO) of the
    /// published size. One that is not is dropped from the index (logged at WARN), so that the
    /// caller serves from the store and narinfos stop advertising it. Blocking: call it off the
    /// async threads.
    pub fn open_entry(&self, hash: StorePathHash, entry: &Entry) -> Option<(std::fs::File, Stamp)> {
        use std::os::unix::fs::OpenOptionsExt;
        let opened = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(&entry.file)
            .map_err(|e| e.to_string())
            .and_then(|f| {
                let meta = f.metadata().map_err(|e| e.to_string())?;
                check_file(&meta, Some(entry.file_size)).map_err(str::to_owned)?;
                Ok((f, Stamp::of(&meta)))
            });
        match opened {
            Ok(f) => Some(f),
            Err(why) => {
                tracing::warn!(file = %entry.file.display(), why, "dropping a damaged NAR cache entry; serving from the store");
                self.inner.forget(hash, entry);
                None
            }
        }
    }

    /// Drops `entry` of `hash`, found damaged by its reader for `why` (WARN): the next request
    /// (or upload) of the path is served from the store, and may fill it again.
    pub fn discard(&self, hash: StorePathHash, entry: &Entry, why: &str) {
        tracing::warn!(file = %entry.file.display(), why, "dropping a damaged NAR cache entry");
        self.inner.forget(hash, entry);
    }

    /// `file` (opened by [`NarCache::open_entry`]) as a reader of the whole entry that checks
    /// its FileHash as it goes: the read that would return the last bytes of a file whose hash
    /// does not match fails instead, so a client never gets a whole damaged file, and the entry
    /// is dropped (WARN) so that the next request is served from the store.
    /// Once the whole file matched, its stamp (`stamp`, taken when it was opened) is recorded:
    /// until the file changes, it is sent without being hashed again.
    pub fn verifying(
        self: &Arc<Self>,
        hash: StorePathHash,
        entry: &Entry,
        file: std::fs::File,
        stamp: Stamp,
    ) -> impl Read + Send + use<> {
        self.inner.stats.checks.fetch_add(1, Ordering::Relaxed);
        Verifying {
            file: file.take(entry.file_size),
            left: entry.file_size,
            hasher: Sha256::new(),
            cache: self.clone(),
            hash,
            entry: entry.clone(),
            stamp,
        }
    }

    /// The entry for `hash` with `nar_hash` once a fill of it that is queued or running has
    /// ended; `None` when there is none (not admitted, cooling down, failed). For the bucket's
    /// uploader, so that a NAR is compressed once for serving and uploading.
    pub async fn after_fill(&self, hash: StorePathHash, nar_hash: &str) -> Option<Entry> {
        loop {
            // Registered before the check, so that a fill ending in between still wakes it.
            let notified = self.inner.filled.notified();
            let mut notified = std::pin::pin!(notified);
            notified.as_mut().enable();
            if !self.inner.is_pending(hash) {
                return self.get(hash, nar_hash);
            }
            notified.await;
        }
    }

    /// The entry without marking it used (for narinfos).
    pub fn peek(&self, hash: StorePathHash, nar_hash: &str) -> Option<Entry> {
        self.inner.lock().entries.get(&hash).filter(|e| e.nar_hash == nar_hash).cloned()
    }

    /// (entries, bytes) now.
    pub fn usage(&self) -> (usize, u64) {
        let index = self.inner.lock();
        (index.entries.len(), index.total)
    }

    /// Notes a request for a path that is not cached; true the second time (fill it).
    pub fn second_request(&self, hash: StorePathHash) -> bool {
        if self.seen.get(&hash).is_some() {
            return true;
        }
        self.seen.insert(hash, ());
        false
    }

    /// Queues `info` (on disk at `disk`, `full` its store path) for filling, unless it is
    /// cached or queued already. Never blocks: a full queue drops it.
    pub(super) fn enqueue(&self, info: Arc<PathInfo>, disk: PathBuf, full: String) {
        let hash = info.path.hash();
        if self.peek(hash, &info.nar_hash).is_some() {
            return;
        }
        // One path may not empty the cache, and a fill that was evicted unused is not made
        // again for a while (each would rewrite it on every request).
        if info.nar_size > self.inner.config.max_size / ADMIT_FRACTION {
            return;
        }
        let cooling = self.inner.cooldown.get(&hash).is_some_and(|at| at.elapsed() < COOLDOWN);
        if cooling {
            return;
        }
        if !self.inner.pending.lock().unwrap_or_else(|e| e.into_inner()).insert(hash) {
            return;
        }
        let sender = self.worker.get_or_init(|| {
            let (tx, rx) = std::sync::mpsc::sync_channel::<Job>(QUEUE);
            let inner = self.inner.clone();
            let handle = tokio::runtime::Handle::try_current().ok();
            let spawned =
                std::thread::Builder::new().name("hearth-nar-fill".into()).spawn(move || fill_loop(&inner, handle, rx));
            if let Err(e) = spawned {
                tracing::warn!(err = %e, "cannot start the NAR cache's fill thread");
            }
            tx
        });
        if sender.try_send(Job { info, disk, full }).is_err() {
            self.inner.pending.lock().unwrap_or_else(|e| e.into_inner()).remove(&hash);
        }
    }
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn done(&self, hash: StorePathHash) {
        self.pending.lock().unwrap_or_else(|e| e.into_inner()).remove(&hash);
        self.filled.notify_waiters();
    }

    fn is_pending(&self, hash: StorePathHash) -> bool {
        self.pending.lock().unwrap_or_else(|e| e.into_inner()).contains(&hash)
    }

    /// Publishes an entry as the most recently used (replacing one of the same path with
    /// another NarHash), and evicts beyond the bound.
    fn publish(&self, hash: StorePathHash, entry: Entry) {
        let mut index = self.lock();
        index.clock += 1;
        let entry = Entry { last_used: index.clock, ..entry };
        index.total += entry.file_size;
        if let Some(old) = index.entries.insert(hash, entry) {
            index.total -= old.file_size;
            let _ = std::fs::remove_file(&old.file);
        }
        drop(index);
        self.evict();
    }

    /// Records that `entry`'s file, as of `stamp`, matched its FileHash (if the stamp has
    /// settled: else the next whole send checks it again).
    fn checked(&self, hash: StorePathHash, entry: &Entry, stamp: Stamp) {
        if !stamp.settled() {
            return;
        }
        if let Some(e) = self.lock().entries.get_mut(&hash).filter(|e| e.file == entry.file) {
            e.checked = Some(stamp);
        }
    }

    /// Drops `entry` of `hash` from the index if it is still the one published; its file is
    /// removed if it is a regular file (a planted link is unlinked, never followed).
    fn forget(&self, hash: StorePathHash, entry: &Entry) {
        let mut index = self.lock();
        if index.entries.get(&hash).is_some_and(|e| e.file == entry.file) {
            if let Some(old) = index.entries.remove(&hash) {
                index.total -= old.file_size;
            }
            drop(index);
            let _ = std::fs::remove_file(&entry.file);
        }
    }

    /// Drops least recently used entries until the total fits `max_size`.
    fn evict(&self) {
        let mut index = self.lock();
        while index.total > self.config.max_size {
            let Some((&hash, _)) = index.entries.iter().min_by_key(|(_, e)| e.last_used) else { break };
            if let Some(old) = index.entries.remove(&hash) {
                index.total -= old.file_size;
                let _ = std::fs::remove_file(&old.file);
                self.stats.evictions.fetch_add(1, Ordering::Relaxed);
                if !old.served {
                    self.cooldown.insert(hash, Instant::now());
                }
            }
        }
    }

    /// Fills one entry: a temp root holds the path, the NAR is written and checked, then renamed
    /// into place and published.
    fn fill(&self, handle: Option<&tokio::runtime::Handle>, job: &Job) -> io::Result<()> {
        let hash = job.info.path.hash();
        let _root = match handle {
            Some(h) => Some(h.block_on(self.roots.add(&job.full)).map_err(|e| io::Error::other(e.to_string()))?),
            None => None,
        };
        if std::fs::symlink_metadata(&job.disk).is_err() {
            return Err(io::Error::new(io::ErrorKind::NotFound, "the path left the store"));
        }
        let started = Instant::now();
        let (tmp, file_hash, file_size) =
            write_entry(&job.disk, &job.info.nar_hash, &self.config.dir, self.config.zstd_level)?;
        let name = format!(
            "{hash}-{}-{}.{}",
            nix32(&job.info.nar_hash),
            nix32(&file_hash),
            ext(self.config.zstd_level.is_some())
        );
        let file = self.config.dir.join(name);
        tmp.persist(&file).map_err(|e| e.error)?;
        // What was just written is what was hashed (known by its stamp once that has settled).
        let checked = Some(Stamp::of(&std::fs::symlink_metadata(&file)?)).filter(Stamp::settled);
        self.stats.fills.fetch_add(1, Ordering::Relaxed);
        self.stats.fill_micros.fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
        if file_size > self.config.max_size / ADMIT_FRACTION {
            return Err(io::Error::other("larger than the cache admits"));
        }
        self.publish(
            hash,
            Entry {
                file,
                nar_hash: job.info.nar_hash.clone(),
                file_hash,
                file_size,
                last_used: 0,
                served: false,
                checked,
            },
        );
        Ok(())
    }
}

/// See [`NarCache::verifying`].
struct Verifying {
    file: io::Take<std::fs::File>,
    left: u64,
    hasher: Sha256,
    cache: Arc<NarCache>,
    hash: StorePathHash,
    entry: Entry,
    stamp: Stamp,
}

impl Read for Verifying {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.file.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.left = self.left.saturating_sub(n as u64);
        if n == 0 && self.left > 0 {
            return Err(self.damaged("shorter than it was written"));
        }
        if self.left == 0 && n > 0 {
            let digest = std::mem::take(&mut self.hasher).finalize();
            if format!("sha256:{}", nixbase32::encode(&digest)) != self.entry.file_hash {
                return Err(self.damaged("its bytes do not match its FileHash"));
            }
            self.cache.inner.checked(self.hash, &self.entry, self.stamp);
        }
        Ok(n)
    }
}

impl Verifying {
    fn damaged(&self, why: &'static str) -> io::Error {
        tracing::warn!(file = %self.entry.file.display(), why, "dropping a damaged NAR cache entry; serving from the store");
        self.cache.inner.forget(self.hash, &self.entry);
        io::Error::new(io::ErrorKind::InvalidData, format!("NAR cache entry damaged: {why}"))
    }
}

/// Whether `meta` (never of a followed link) is an entry file as hearth writes them: a regular
/// file owned by this process's user, of `size` bytes where that is known.
fn check_file(meta: &std::fs::Metadata, size: Option<u64>) -> Result<(), &'static str> {
    use std::os::unix::fs::MetadataExt;
    if !meta.file_type().is_file() {
        return Err("not a regular file");
    }
    if meta.uid() != rustix::process::geteuid().as_raw() {
        return Err("owned by another user");
    }
    if size.is_some_and(|s| s != meta.len()) {
        return Err("not the size it was written with");
    }
    Ok(())
}

/// The fill thread: one path at a time, at the lowest CPU priority, until the cache is dropped.
fn fill_loop(inner: &Inner, handle: Option<tokio::runtime::Handle>, rx: std::sync::mpsc::Receiver<Job>) {
    lower_priority();
    while let Ok(job) = rx.recv() {
        let hash = job.info.path.hash();
        if let Err(e) = inner.fill(handle.as_ref(), &job) {
            inner.stats.fill_failures.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(path = %job.full, err = %e, "NAR cache fill failed; the path is served as before");
        }
        inner.done(hash);
    }
}

/// Makes the calling thread the least important on the CPU (nice 19).
pub(crate) fn lower_priority() {
    // SAFETY: setpriority(2) with PRIO_PROCESS and 0 changes only the calling thread on Linux;
    // it reads and writes no memory of ours.
    #[allow(unsafe_code)]
    unsafe {
        libc::setpriority(libc::PRIO_PROCESS, 0, 19);
    }
}

/// Writes the NAR of `disk` into a temporary file in `dir` (zstd at `level`, or plain),
/// checking its sha256 against `nar_hash`; returns the temporary file, its sha256 and size.
pub(crate) fn write_entry(
    disk: &Path,
    nar_hash: &str,
    dir: &Path,
    level: Option<i32>,
) -> io::Result<(tempfile::NamedTempFile, String, u64)> {
    let tmp = tempfile::Builder::new().prefix(".tmp").tempfile_in(dir)?;
    let mut reader = HashingReader { inner: NarReader::open(disk)?, hasher: Sha256::new() };
    let mut out = HashingWriter {
        inner: io::BufWriter::with_capacity(1 << 20, tmp.reopen()?),
        hasher: Sha256::new(),
        written: 0,
    };
    match level {
        Some(level) => {
            let mut enc = zstd::stream::write::Encoder::new(&mut out, level)?;
            // Paid once per path, not per download: use both cores.
            let _ = enc.multithread(2);
            io::copy(&mut reader, &mut enc)?;
            enc.finish()?;
        }
        None => {
            io::copy(&mut reader, &mut out)?;
        }
    }
    out.inner.flush()?;
    let nar = format!("sha256:{}", nixbase32::encode(&reader.hasher.finalize()));
    if nar != nar_hash {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("NAR hash {nar} is not the store's {nar_hash}"),
        ));
    }
    let HashingWriter { hasher, written: size, inner } = out;
    inner.into_inner().map_err(|e| e.into_error())?.sync_data()?;
    let file_hash = format!("sha256:{}", nixbase32::encode(&hasher.finalize()));
    Ok((tmp, file_hash, size))
}

struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    written: u64,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes_mean_what_their_units_say() {
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("20GiB"), Some(20 << 30));
        assert_eq!(parse_size("20G"), Some(20 << 30));
        assert_eq!(parse_size("20GB"), Some(20_000_000_000));
        assert_eq!(parse_size("500 MiB"), Some(500 << 20));
        assert_eq!(parse_size("500MB"), Some(500_000_000));
        assert_eq!(parse_size("1PiB"), Some(1 << 50));
        assert_eq!(parse_size("1PB"), Some(1_000_000_000_000_000));
        for bad in ["", "GiB", "1.5GiB", "-1", "20 gigs", "99999999999PiB"] {
            assert_eq!(parse_size(bad), None, "{bad}");
        }
    }
}
