//! Local copies of the bucket's NARs for a read-through hearth: however many hosts ask for the
//! same NAR at once, it is fetched from the bucket once, written to a bounded directory, and
//! every request streams it from there, the first ones while it is still arriving.
//!
//! - Named by their FileHash (`<nix32>.nar.zst`, as the bucket names them), so a copy is
//!   immutable and checkable: the sha256 of the bytes is compared with the name as they are
//!   written, and a copy that does not match is never published. Until it is checked, the last
//!   bytes are held back from every reader, so a client never gets the whole of a bad copy.
//! - A copy in the making lives in `.part-<name>`; the directory is the index, read back at
//!   startup (leftover parts are deleted). Least recently used copies go first past `max_size`;
//!   a file deleted while it is read stays readable to its open readers.
//! - A copy that failed (the bucket went away, the disk is full) makes its readers' streams fail
//!   (Nix retries), and for a minute that object is streamed from the bucket instead.
//!
//! Only whole GETs start a copy; a Range is answered from a finished copy, else by the bucket.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{Stream, StreamExt};
use sha2::Digest;
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
use tokio::sync::watch;

use super::Bucket;

/// A copy may take at most this fraction of `max_size`: one huge NAR must not empty the cache.
const ADMIT_FRACTION: u64 = 8;
/// How long an object whose copy failed is streamed from the bucket instead.
const FAILED_COOLDOWN: Duration = Duration::from_secs(60);
/// Bytes read from a copy at a time.
const CHUNK: usize = 256 << 10;
/// Copies in the making at most; past it, requests stream from the bucket. A copy goes on when
/// its client leaves (others may be reading it), so this, not the HTTP stream bound, bounds
/// them.
const MAX_FILLS: usize = 32;

/// How far a copy has come: readers may read `readable` bytes; `failed` ends them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Progress {
    readable: u64,
    failed: bool,
}

struct Copy {
    /// The file readers open: the part file while it is filled, then the copy itself.
    file: PathBuf,
    size: u64,
    progress: watch::Receiver<Progress>,
    last_used: u64,
    complete: bool,
}

#[derive(Default)]
struct Index {
    copies: HashMap<String, Copy>,
    /// Bytes of complete copies.
    total: u64,
    /// Bytes of copies in the making: room is made for them before they start.
    reserved: u64,
    clock: u64,
}

impl Index {
    /// Whether a copy of `size` bytes may start: it fits beside the copies being made (finished
    /// ones can be evicted for it; those being made cannot), so what the directory holds never
    /// exceeds `max_size`.
    fn admits(&self, size: u64, max_size: u64) -> bool {
        self.reserved.saturating_add(size) <= max_size
    }

    /// Drops least recently used finished copies until everything fits `max_size`.
    fn evict(&mut self, max_size: u64) {
        while self.total + self.reserved > max_size {
            let oldest = self.copies.iter().filter(|(_, c)| c.complete).min_by_key(|(_, c)| c.last_used);
            let Some(name) = oldest.map(|(n, _)| n.clone()) else { break };
            if let Some(old) = self.copies.remove(&name) {
                self.total -= old.size;
                let _ = std::fs::remove_file(&old.file);
            }
        }
    }
}

/// Counters for the metrics.
#[derive(Default, Debug)]
pub struct ReadCacheStats {
    pub hits: std::sync::atomic::AtomicU64,
    pub fills: std::sync::atomic::AtomicU64,
    pub fill_failures: std::sync::atomic::AtomicU64,
}

/// The directory of copies.
pub struct ReadCache {
    dir: PathBuf,
    max_size: u64,
    index: Mutex<Index>,
    failed: quick_cache::sync::Cache<String, Instant>,
    fills: Arc<tokio::sync::Semaphore>,
    pub stats: ReadCacheStats,
}

/// A copy's name: `<52 nix32 characters>.nar.zst`, nothing else (never a path).
fn valid_name(name: &str) -> bool {
    name.strip_suffix(".nar.zst")
        .is_some_and(|h| h.len() == 52 && crate::nix::nixbase32::decode_fixed::<32>(h.as_bytes()).is_some())
}

impl ReadCache {
    /// Opens (creating) `dir`, drops unfinished copies and reads the finished ones back.
    pub fn open(dir: &Path, max_size: u64) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let mut found = Vec::new();
        for e in std::fs::read_dir(dir)? {
            let e = e?;
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(".part-") {
                let _ = std::fs::remove_file(e.path());
                continue;
            }
            let meta = std::fs::symlink_metadata(e.path())?;
            if !valid_name(&name) || !meta.file_type().is_file() {
                continue;
            }
            let mtime = meta.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok());
            found.push((mtime.map_or(0, |d| d.as_secs()), name, meta.len()));
        }
        found.sort();
        let cache = Self {
            dir: dir.to_owned(),
            max_size,
            index: Mutex::default(),
            failed: quick_cache::sync::Cache::new(10_000),
            fills: Arc::new(tokio::sync::Semaphore::new(MAX_FILLS)),
            stats: ReadCacheStats::default(),
        };
        for (_, name, size) in found {
            let (_, rx) = watch::channel(Progress { readable: size, failed: false });
            let file = dir.join(&name);
            cache.publish(name, Copy { file, size, progress: rx, last_used: 0, complete: true });
        }
        Ok(cache)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// (copies, bytes) of finished copies.
    pub fn usage(&self) -> (usize, u64) {
        let index = self.lock();
        (index.copies.values().filter(|c| c.complete).count(), index.total)
    }

    /// The size of the finished copy of `name`, if there is one: it is served without asking
    /// the bucket (which may be away).
    pub fn finished_size(&self, name: &str) -> Option<u64> {
        self.lock().copies.get(name).filter(|c| c.complete).map(|c| c.size)
    }

    fn publish(&self, name: String, copy: Copy) {
        let mut index = self.lock();
        index.clock += 1;
        let copy = Copy { last_used: index.clock, ..copy };
        if copy.complete {
            index.total += copy.size;
        }
        if let Some(old) = index.copies.insert(name, copy)
            && old.complete
        {
            index.total -= old.size;
        }
        index.evict(self.max_size);
    }

    /// The bytes `[start, end)` of the object `name` (`size` bytes in the bucket) from its copy:
    /// a finished one for any range, one being made for the whole object only; a whole GET of an
    /// object without a copy starts one. `None`: this object is not copied (too large, a copy
    /// failed a moment ago, a range of an unfinished copy); stream it from the bucket.
    pub async fn read(
        self: &Arc<Self>,
        bucket: &Bucket,
        name: &str,
        size: u64,
        start: u64,
        end: u64,
    ) -> Option<impl Stream<Item = std::io::Result<Bytes>> + Send + 'static + use<>> {
        // An empty object is no NAR (and no copy holds back a last byte of it).
        if !valid_name(name) || size == 0 {
            return None;
        }
        let whole = start == 0 && end == size;
        let (file, progress) = {
            let mut index = self.lock();
            index.clock += 1;
            let clock = index.clock;
            match index.copies.get_mut(name).filter(|c| c.size == size) {
                Some(copy) if copy.complete || whole => {
                    copy.last_used = clock;
                    self.stats.hits.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    (copy.file.clone(), copy.progress.clone())
                }
                Some(_) => return None,
                None => {
                    let cooling = self.failed.get(name).is_some_and(|at| at.elapsed() < FAILED_COOLDOWN);
                    if !whole || cooling || size > self.max_size / ADMIT_FRACTION || !index.admits(size, self.max_size)
                    {
                        return None;
                    }
                    let permit = self.fills.clone().try_acquire_owned().ok()?;
                    let part = self.dir.join(format!(".part-{name}"));
                    let (tx, rx) = watch::channel(Progress { readable: 0, failed: false });
                    // Created before anyone reads it.
                    if std::fs::File::create(&part).is_err() {
                        return None;
                    }
                    let copy =
                        Copy { file: part.clone(), size, progress: rx.clone(), last_used: clock, complete: false };
                    if let Some(old) = index.copies.insert(name.to_owned(), copy)
                        && old.complete
                    {
                        index.total -= old.size;
                    }
                    index.reserved += size;
                    index.evict(self.max_size);
                    let (me, bucket, name, filling) = (self.clone(), bucket.clone(), name.to_owned(), part.clone());
                    tokio::spawn(async move {
                        me.fill(&bucket, &name, size, &filling, tx).await;
                        drop(permit);
                    });
                    (part, rx)
                }
            }
        };
        let file = match tokio::fs::File::open(&file).await {
            Ok(f) => f,
            // A copy evicted or finished (renamed) between the lookup and the open.
            Err(_) => tokio::fs::File::open(self.dir.join(name)).await.ok()?,
        };
        Some(tail(file, start, end, progress))
    }

    /// Fetches the object into `part`, checking its hash, then publishes it under its name.
    async fn fill(&self, bucket: &Bucket, name: &str, size: u64, part: &Path, tx: watch::Sender<Progress>) {
        self.stats.fills.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let result = self.download(bucket, name, size, part, &tx).await;
        // Finished or not, its room is its own no longer (a finished copy counts as one).
        self.lock().reserved -= size;
        match result {
            Ok(()) => {
                let file = self.dir.join(name);
                match std::fs::rename(part, &file) {
                    Ok(()) => {
                        let rx = tx.subscribe();
                        self.publish(name.to_owned(), Copy { file, size, progress: rx, last_used: 0, complete: true });
                        tx.send_replace(Progress { readable: size, failed: false });
                        return;
                    }
                    Err(e) => tracing::warn!(%name, err = %e, "cannot publish a copy of a bucket NAR"),
                }
            }
            Err(e) => {
                tracing::warn!(%name, err = %e, "copying a bucket NAR failed; it is streamed from the bucket for a minute")
            }
        }
        self.stats.fill_failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.failed.insert(name.to_owned(), Instant::now());
        self.lock().copies.remove(name);
        let _ = std::fs::remove_file(part);
        tx.send_modify(|p| p.failed = true);
    }

    async fn download(
        &self,
        bucket: &Bucket,
        name: &str,
        size: u64,
        part: &Path,
        tx: &watch::Sender<Progress>,
    ) -> Result<(), String> {
        let mut out = tokio::fs::OpenOptions::new().write(true).open(part).await.map_err(|e| e.to_string())?;
        let mut stream = bucket.stream(&format!("nar/{name}"), 0..size).await.map_err(|e| e.to_string())?;
        let mut hasher = sha2::Sha256::new();
        let mut written = 0u64;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| e.to_string())?;
            hasher.update(&chunk);
            out.write_all(&chunk).await.map_err(|e| e.to_string())?;
            out.flush().await.map_err(|e| e.to_string())?;
            written += chunk.len() as u64;
            if written > size {
                return Err("the bucket sent more than the object's size".into());
            }
            // The last byte waits for the hash check.
            tx.send_replace(Progress { readable: written.min(size - 1), failed: false });
        }
        if written != size {
            return Err(format!("the bucket sent {written} of {size} bytes"));
        }
        let digest = hasher.finalize();
        if crate::nix::nixbase32::encode(&digest) != name.trim_end_matches(".nar.zst") {
            return Err("its bytes do not match its FileHash".into());
        }
        out.sync_data().await.map_err(|e| e.to_string())?;
        Ok(())
    }
}

/// `[start, end)` of `file`, each byte once the copy has it.
fn tail(
    file: tokio::fs::File,
    start: u64,
    end: u64,
    progress: watch::Receiver<Progress>,
) -> impl Stream<Item = std::io::Result<Bytes>> + Send + 'static {
    futures::stream::unfold((file, start, progress, start > 0), move |(mut file, at, mut progress, seek)| async move {
        if at >= end {
            return None;
        }
        let result = async {
            if seek {
                file.seek(std::io::SeekFrom::Start(at)).await?;
            }
            let readable = loop {
                let p = *progress.borrow_and_update();
                if p.readable > at {
                    break p.readable;
                }
                if p.failed || progress.changed().await.is_err() {
                    return Err(std::io::Error::other("the copy from the bucket failed"));
                }
            };
            let want = (readable.min(end) - at).min(CHUNK as u64) as usize;
            let mut buf = vec![0u8; want];
            file.read_exact(&mut buf).await?;
            Ok(Bytes::from(buf))
        }
        .await;
        match result {
            Ok(bytes) => {
                let next = at + bytes.len() as u64;
                Some((Ok(bytes), (file, next, progress, false)))
            }
            // One error, then the end.
            Err(e) => Some((Err(e), (file, end, progress, false))),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_copy_starts_only_if_it_fits_beside_those_being_made() {
        let max = 64 << 20;
        let mut index = Index::default();
        let copy = 7_500_000;
        // Copies being made reserve their room; finished ones could be evicted, so they do not count.
        let mut started = 0;
        for _ in 0..16 {
            if index.admits(copy, max) {
                index.reserved += copy;
                started += 1;
            }
        }
        assert_eq!(started, 8, "16 fills of 7.5 MB at once in 64 MiB");
        assert!(index.reserved <= max);
        index.total = 40 << 20;
        index.reserved = 0;
        assert!(index.admits(copy, max), "finished copies make room");
    }

    #[test]
    fn only_nix32_file_hash_names_are_copies() {
        assert!(valid_name("1b9p07z77phvv2hf6gm9f28syp39f1ag7x3i6dq8vx8dfnhqkpxs.nar.zst"));
        for bad in ["../etc/passwd", "x.nar.zst", "1b9p07z77phvv2hf6gm9f28syp39f1ag7x3i6dq8vx8dfnhqkpxe.nar.zst", ""] {
            assert!(!valid_name(bad), "{bad}");
        }
    }
}
