//! Pushing store paths to the bucket, in the background: a bounded queue, `upload_concurrency`
//! workers, one NAR at a time each. A path already in the bucket costs one request (its
//! narinfo's HEAD); otherwise its NAR is compressed once (or taken from the hot NAR cache when
//! that holds it compressed) and uploaded under its FileHash, checked against it as it is sent.
//! NARs upload in any order and in parallel; a push's narinfos are written by its publisher in
//! the closure's topological order, each only once its NAR is complete and the narinfo of every
//! path it references is in the bucket, so the bucket never shows a path whose closure it lacks.
//! Failures are retried with backoff and counted; they never fail a build.
//!
//! Nothing here is waited for by a build's reply: a push returns at once, its checks run in
//! the background. A bucket that does not answer is noticed once (a circuit breaker, open for
//! [`AWAY`]): while it is open no path is asked about or uploaded (each would wait for its own
//! timeout), the paths of the pushes count as failed, and the next build pushes them again.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;

use super::{Bucket, BucketError, nar_key, narinfo_key};
use crate::fleet::Pushed;
use crate::metrics::Metrics;
use crate::nix::narinfo::NarInfo;
use crate::nix::signing::SecretKey;
use crate::store::{PathInfo, Store};

/// Paths waiting at most; a closure beyond it is pushed again by the next build.
const QUEUE: usize = 100_000;
/// How long an upload waits for the hot NAR store's fill of its path at most.
const FILL_WAIT: Duration = Duration::from_secs(3600);
/// Attempts per path before it counts as failed.
const ATTEMPTS: u32 = 5;

/// The uploader, shared by `Arc`.
pub struct Uploader {
    bucket: Bucket,
    store: Arc<Store>,
    keys: Vec<SecretKey>,
    level: i32,
    metrics: Arc<Metrics>,
    tx: tokio::sync::mpsc::Sender<Arc<PathInfo>>,
    rx: tokio::sync::Mutex<tokio::sync::mpsc::Receiver<Arc<PathInfo>>>,
    /// Paths queued or being uploaded (so a path is in the queue once), and the pushes waiting
    /// for each.
    pending: Mutex<HashMap<String, Vec<Arc<Batch>>>>,
    tmp_dir: std::path::PathBuf,
    /// Until when the bucket is taken to be away (the circuit breaker).
    away_until: Mutex<Option<std::time::Instant>>,
}

/// How often a push waiting for a gc looks at its lease.
const LEASE_POLL: Duration = Duration::from_secs(2);

/// How long a bucket that did not answer is left alone.
const AWAY: Duration = Duration::from_secs(60);

/// A path's NAR as a zstd file, to upload.
struct Compressed {
    file: std::path::PathBuf,
    /// `sha256:<nix32>` of the file: what it is named by in the bucket.
    file_hash: String,
    file_size: u64,
    /// For a file made for this upload: deletes it when the upload is done (held, never read).
    _made: Option<tempfile::TempPath>,
    /// The hot NAR cache's entry, when the file is one.
    hot: Option<crate::store::nar_cache::Entry>,
}

/// How a queued path's NAR upload ended, for the pushes waiting for it.
#[derive(Debug, Clone)]
enum NarDone {
    /// Its narinfo was in the bucket already when the upload came to it.
    Present,
    /// Its NAR is complete in the bucket; this signed narinfo is to be written.
    Ready(String),
    /// It could not be uploaded this time.
    Failed,
}

/// One push of a closure, followed as its uploads end.
pub struct Batch {
    state: tokio::sync::watch::Sender<Pushed>,
    /// Each queued path's NAR result (by its basename), for the push's publisher.
    nars: tokio::sync::mpsc::UnboundedSender<(String, NarDone)>,
}

type NarResults = tokio::sync::mpsc::UnboundedReceiver<(String, NarDone)>;

impl Batch {
    /// A push of `total` paths, all queued until their checks say otherwise.
    fn new(total: usize) -> (Arc<Self>, NarResults) {
        let (state, _) =
            tokio::sync::watch::channel(Pushed { present: 0, total, queued: total, failed: 0, uploaded: 0 });
        let (nars, results) = tokio::sync::mpsc::unbounded_channel();
        (Arc::new(Self { state, nars }), results)
    }

    /// Where it stands now.
    pub fn now(&self) -> Pushed {
        *self.state.borrow()
    }

    /// Waits until no path of it is queued, and says how it ended.
    pub async fn finished(&self) -> Pushed {
        let mut rx = self.state.subscribe();
        // The sender is `self`: it outlives this wait.
        rx.wait_for(|p| p.queued == 0).await.map(|p| *p).unwrap_or_else(|_| self.now())
    }

    fn update(&self, change: impl FnOnce(&mut Pushed)) {
        self.state.send_modify(change);
    }
}

impl Uploader {
    pub fn new(
        bucket: Bucket,
        store: Arc<Store>,
        keys: Vec<SecretKey>,
        level: i32,
        metrics: Arc<Metrics>,
        state_dir: &std::path::Path,
    ) -> Arc<Self> {
        let (tx, rx) = tokio::sync::mpsc::channel(QUEUE);
        Arc::new(Self {
            bucket,
            store,
            keys,
            level,
            metrics,
            tx,
            rx: tokio::sync::Mutex::new(rx),
            pending: Mutex::new(HashMap::new()),
            // NARs compressed for an upload, in `<state_dir>/uploads`.
            tmp_dir: state_dir.join("uploads"),
            away_until: Mutex::new(None),
        })
    }

    /// Whether the circuit breaker is open.
    fn away(&self) -> bool {
        self.away_until.lock().unwrap_or_else(|e| e.into_inner()).is_some_and(|until| std::time::Instant::now() < until)
    }

    /// Opens the circuit breaker after `err`, saying so once.
    fn went_away(&self, err: &BucketError) {
        let mut until = self.away_until.lock().unwrap_or_else(|e| e.into_inner());
        let was_away = until.is_some_and(|u| std::time::Instant::now() < u);
        *until = Some(std::time::Instant::now() + AWAY);
        if !was_away {
            tracing::warn!(bucket = %self.bucket.name, err = %err, "the bucket does not answer; pushes wait {}s, their paths are pushed again by a later build", AWAY.as_secs());
        }
    }

    /// Starts `workers` upload tasks (and writes `nix-cache-info` if the bucket lacks it).
    pub fn start(self: &Arc<Self>, workers: usize) {
        forget_leftovers(&self.tmp_dir);
        let me = self.clone();
        tokio::spawn(async move {
            // Nothing of this hearth's is being uploaded yet: what its journal holds was cut.
            let aborted = me.bucket.abort_stale_uploads(Duration::ZERO).await;
            if aborted > 0 {
                tracing::info!(aborted, "aborted multipart uploads a stop left behind");
            }
            for attempt in 0..ATTEMPTS {
                match me.cache_info().await {
                    Ok(()) => break,
                    Err(e) => {
                        tracing::warn!(bucket = %me.bucket.name, err = %e, "cannot write nix-cache-info yet");
                        tokio::time::sleep(backoff(attempt)).await;
                    }
                }
            }
        });
        for _ in 0..workers.max(1) {
            let me = self.clone();
            tokio::spawn(async move { me.work().await });
        }
    }

    async fn cache_info(&self) -> Result<(), BucketError> {
        if self.bucket.exists("nix-cache-info").await? {
            return Ok(());
        }
        let text = format!("StoreDir: {}\nWantMassQuery: 1\nPriority: 50\n", self.store.store_dir());
        self.bucket.put("nix-cache-info", text.into()).await
    }

    /// The bucket it uploads to.
    pub fn bucket(&self) -> &Bucket {
        &self.bucket
    }

    /// Pushes `closure`: returns at once with every path queued, and in the background asks
    /// the bucket for each (one HEAD each, `concurrency` at a time) and queues those it lacks;
    /// the batch says how much of it the bucket holds as the checks and uploads end.
    pub fn push(self: &Arc<Self>, closure: &[Arc<PathInfo>], concurrency: usize) -> Arc<Batch> {
        self.push_after(closure, concurrency, async {})
    }

    /// As [`Uploader::push`], its checks starting once `ready` has (for the builder: once the
    /// record names the system, so that a gc that reads the record after this push's checks
    /// keeps it) and no gc holds the bucket's lease.
    pub fn push_after(
        self: &Arc<Self>,
        closure: &[Arc<PathInfo>],
        concurrency: usize,
        ready: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Arc<Batch> {
        let (batch, results) = Batch::new(closure.len());
        let (me, paths, pushed) = (self.clone(), closure.to_vec(), batch.clone());
        tokio::spawn(async move {
            ready.await;
            me.after_gc().await;
            let (queued, missing) = me.check(paths, concurrency, &pushed).await;
            me.publish(queued, missing, results, &pushed).await;
        });
        batch
    }

    /// Waits while a `hearth bucket gc` holds the bucket's lease: a path found in the bucket
    /// meanwhile could be one that gc, having read the record before it named the path, is
    /// about to delete. Not waited for if the bucket does not answer (the checks will say).
    async fn after_gc(&self) {
        let mut said = false;
        loop {
            let now = crate::utc::now();
            match super::gc_lease(&self.bucket, now).await {
                Ok(Some(started)) => {
                    if !std::mem::replace(&mut said, true) {
                        tracing::info!(bucket = %self.bucket.name, gc_started = started, "a bucket gc runs; pushes wait for it to end");
                    }
                    tokio::time::sleep(LEASE_POLL).await;
                }
                Ok(None) | Err(_) => return,
            }
        }
    }

    /// Asks the bucket for each path of `closure` and queues the NAR uploads of those it lacks.
    /// Returns the paths queued, and those the bucket lacks that could not be queued.
    async fn check(
        &self,
        closure: Vec<Arc<PathInfo>>,
        concurrency: usize,
        batch: &Arc<Batch>,
    ) -> (Vec<Arc<PathInfo>>, HashSet<String>) {
        let (mut queued, mut missing) = (Vec::new(), HashSet::new());
        let checks = futures::stream::iter(closure)
            .map(|info| async move {
                // Open breaker: not asked (nor the rest of the push).
                if self.away() {
                    return (info, None);
                }
                let key = narinfo_key(info.path.hash().as_str());
                let present = self.bucket.exists(&key).await;
                if let Err(e) = &present {
                    self.went_away(e);
                }
                (info, present.ok())
            })
            .buffer_unordered(concurrency.max(1));
        let mut checks = std::pin::pin!(checks);
        while let Some((info, present)) = checks.next().await {
            match present {
                Some(true) => batch.update(|p| {
                    p.queued -= 1;
                    p.present += 1;
                }),
                Some(false) if self.enqueue(info.clone(), batch) => queued.push(info),
                // The queue is full, or the bucket is away.
                Some(false) | None => {
                    missing.insert(info.path.to_string());
                    batch.update(|p| {
                        p.queued -= 1;
                        p.failed += 1;
                    })
                }
            }
        }
        (queued, missing)
    }

    /// Writes the narinfos of a push's `queued` paths in topological order (references
    /// first), each once its NAR is complete and every path it references is in the bucket:
    /// present when checked, or published here before it. A path whose NAR or a reference of
    /// which is `missing` is not published (it counts as failed; a later push tries again).
    async fn publish(
        &self,
        queued: Vec<Arc<PathInfo>>,
        mut missing: HashSet<String>,
        mut results: NarResults,
        batch: &Arc<Batch>,
    ) {
        let mut done: HashMap<String, NarDone> = HashMap::new();
        for info in topological(queued) {
            let path = info.path.to_string();
            while !done.contains_key(&path) {
                let Some((p, result)) = results.recv().await else { break };
                done.insert(p, result);
            }
            let complete = info.references.iter().all(|r| *r == path || !missing.contains(r));
            let (present, uploaded) = match done.remove(&path) {
                Some(NarDone::Present) if complete => (true, false),
                Some(NarDone::Ready(narinfo)) if complete => (self.write_narinfo(&info, narinfo).await, true),
                _ => (false, false),
            };
            if !present {
                missing.insert(path);
            }
            batch.update(|p| {
                p.queued -= 1;
                match (present, uploaded) {
                    (true, true) => (p.present, p.uploaded) = (p.present + 1, p.uploaded + 1),
                    (true, false) => p.present += 1,
                    (false, _) => p.failed += 1,
                }
            });
        }
    }

    /// Writes a path's signed narinfo, retried with backoff; whether it is in the bucket.
    async fn write_narinfo(&self, info: &PathInfo, narinfo: String) -> bool {
        let key = narinfo_key(info.path.hash().as_str());
        for attempt in 0..ATTEMPTS {
            match self.bucket.put(&key, narinfo.clone().into()).await {
                Ok(()) => {
                    self.metrics.bucket_upload_objects.inc();
                    return true;
                }
                Err(e) => {
                    tracing::warn!(path = %info.path, attempt = attempt + 1, err = %e, "writing a narinfo failed; retrying");
                    tokio::time::sleep(backoff(attempt)).await;
                }
            }
        }
        self.metrics.bucket_upload_failures.inc();
        false
    }

    /// Queues `info` for `batch` (joining an upload already queued); false if the queue is full.
    fn enqueue(&self, info: Arc<PathInfo>, batch: &Arc<Batch>) -> bool {
        let key = info.path.to_string().to_owned();
        {
            let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(waiting) = pending.get_mut(&key) {
                waiting.push(batch.clone());
                return true;
            }
            pending.insert(key.clone(), vec![batch.clone()]);
        }
        if self.tx.try_send(info).is_err() {
            self.pending.lock().unwrap_or_else(|e| e.into_inner()).remove(&key);
            tracing::warn!(path = %key, "the upload queue is full; the path is pushed again by a later build");
            return false;
        }
        self.metrics.bucket_upload_queue.inc();
        true
    }

    async fn work(self: Arc<Self>) {
        loop {
            let next = self.rx.lock().await.recv().await;
            let Some(info) = next else { return };
            self.metrics.bucket_upload_queue.dec();
            let mut done = NarDone::Failed;
            for attempt in 0..ATTEMPTS {
                // A bucket that is away is not tried path by path: this one waits for a later build.
                if self.away() {
                    break;
                }
                match self.upload(&info).await {
                    Ok(result) => {
                        done = result;
                        break;
                    }
                    Err(e) => {
                        if matches!(e, BucketError::S3(_)) && attempt + 1 >= 2 {
                            self.went_away(&e);
                        }
                        tracing::warn!(path = %info.path.to_string(), attempt = attempt + 1, err = %e, "upload failed; retrying");
                        tokio::time::sleep(backoff(attempt)).await;
                    }
                }
            }
            if matches!(done, NarDone::Failed) {
                self.metrics.bucket_upload_failures.inc();
                tracing::error!(path = %info.path.to_string(), "upload failed for good; a later build pushes it again");
            }
            let waiting = self.pending.lock().unwrap_or_else(|e| e.into_inner()).remove(&info.path.to_string());
            for batch in waiting.into_iter().flatten() {
                // A push whose publisher is gone has nothing left to write.
                let _ = batch.nars.send((info.path.to_string(), done.clone()));
            }
        }
    }

    /// One path's NAR (compressed once), and the narinfo its push's publisher writes.
    async fn upload(&self, info: &Arc<PathInfo>) -> Result<NarDone, BucketError> {
        let narinfo_key = narinfo_key(info.path.hash().as_str());
        if self.bucket.exists(&narinfo_key).await? {
            return Ok(NarDone::Present);
        }
        let nar = self.compressed(info).await?;
        let key = nar_key(&nar.file_hash);
        if !self.bucket.exists(&key).await? {
            // Its bytes are checked against the FileHash it is named by as they are sent.
            let sent = match self.bucket.put_file(&key, &nar.file, &nar.file_hash).await {
                Ok(sent) => sent,
                Err(e @ BucketError::Damaged { .. }) => {
                    // A hot entry damaged in place: dropped, so that the retry compresses
                    // the path from the store again.
                    if let (Some(entry), Some(cache)) = (&nar.hot, self.store.nar_cache()) {
                        cache.discard(info.path.hash(), entry, "its bytes do not match its FileHash");
                    }
                    return Err(e);
                }
                Err(e) => return Err(e),
            };
            self.metrics.bucket_upload_bytes.inc_by(sent);
            self.metrics.bucket_upload_objects.inc();
        }
        // The path becomes visible only when its publisher writes this, after its references.
        Ok(NarDone::Ready(self.narinfo(info, &key, &nar.file_hash, nar.file_size).to_string()))
    }

    /// The path's NAR as a zstd file: the hot NAR cache's entry when it holds one (or fills it
    /// now), else one made now on a thread of its own at the lowest CPU priority, its NarHash
    /// checked as it is written.
    async fn compressed(&self, info: &Arc<PathInfo>) -> Result<Compressed, BucketError> {
        if let Some(cache) = self.store.nar_cache().filter(|c| c.compressed()) {
            // Not there yet: filled now (or a fill under way awaited), so that serving the
            // host and uploading it share one compression.
            let entry = match cache.get(info.path.hash(), &info.nar_hash) {
                Some(entry) => Some(entry),
                None => {
                    self.store.cache_nars(std::slice::from_ref(info));
                    // Bounded: a fill thread that never comes leaves the upload to make its own.
                    let fill = cache.after_fill(info.path.hash(), &info.nar_hash);
                    tokio::time::timeout(FILL_WAIT, fill).await.ok().flatten()
                }
            };
            if let Some(entry) = entry {
                let (file, file_hash, file_size) = (entry.file.clone(), entry.file_hash.clone(), entry.file_size);
                return Ok(Compressed { file, file_hash, file_size, _made: None, hot: Some(entry) });
            }
        }
        let Some(_root) = self.store.hold(&info.path).await.map_err(|e| BucketError::Store(e.to_string()))? else {
            return Err(BucketError::Store(format!("{} is no longer in the store", info.path)));
        };
        tokio::fs::create_dir_all(&self.tmp_dir).await?;
        let (disk, nar_hash, dir, level) =
            (self.store.disk_path(&info.path), info.nar_hash.clone(), self.tmp_dir.clone(), self.level);
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::Builder::new().name("hearth-upload-zstd".into()).spawn(move || {
            crate::store::nar_cache::lower_priority();
            let _ = tx.send(crate::store::nar_cache::write_entry(&disk, &nar_hash, &dir, Some(level)));
        })?;
        let (tmp, hash, size) = rx.await.map_err(|_| BucketError::Store("the compression thread died".into()))??;
        let path = tmp.into_temp_path();
        Ok(Compressed { file: path.to_path_buf(), file_hash: hash, file_size: size, _made: Some(path), hot: None })
    }

    fn narinfo(&self, info: &PathInfo, key: &str, file_hash: &str, file_size: u64) -> NarInfo {
        let store_dir = self.store.store_dir();
        let mut narinfo = info.narinfo(store_dir, key.to_owned(), "zstd", Some((file_hash.to_owned(), file_size)));
        let fingerprint = narinfo.fingerprint(store_dir);
        narinfo.sigs = self.keys.iter().map(|k| k.sign(&fingerprint)).collect();
        narinfo
    }
}

/// `paths` ordered so that every path comes after the paths of `paths` it references (a
/// depth-first walk, references first; a path's reference to itself is no edge).
fn topological(paths: Vec<Arc<PathInfo>>) -> Vec<Arc<PathInfo>> {
    let by_name: HashMap<String, usize> = paths.iter().enumerate().map(|(i, p)| (p.path.to_string(), i)).collect();
    let mut seen = vec![false; paths.len()];
    let mut order = Vec::with_capacity(paths.len());
    for start in 0..paths.len() {
        if seen[start] {
            continue;
        }
        seen[start] = true;
        // (path, its next reference to look at): an explicit stack, so depth is no recursion.
        let mut stack = vec![(start, 0usize)];
        while let Some((at, next)) = stack.pop() {
            let refs = &paths[at].references;
            if let Some(r) = refs.get(next) {
                stack.push((at, next + 1));
                if let Some(&i) = by_name.get(r).filter(|&&i| !seen[i]) {
                    seen[i] = true;
                    stack.push((i, 0));
                }
            } else {
                order.push(at);
            }
        }
    }
    let mut slots: Vec<Option<Arc<PathInfo>>> = paths.into_iter().map(Some).collect();
    order.into_iter().filter_map(|i| slots[i].take()).collect()
}

/// Deletes compressed NARs a killed process left in `dir`: those not written to for an hour
/// (one being made now is written to all the time; another process may share the directory).
fn forget_leftovers(dir: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let stale = e.metadata().ok().and_then(|m| m.modified().ok()).and_then(|t| t.elapsed().ok());
        if e.file_name().to_string_lossy().starts_with(".tmp")
            && stale.is_some_and(|age| age > Duration::from_secs(3600))
        {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

fn backoff(attempt: u32) -> Duration {
    Duration::from_secs(1u64 << attempt.min(5))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_batch_ends_when_its_last_queued_path_does() {
        // Every path is queued until its check or upload ends.
        let (batch, _results) = Batch::new(3);
        assert_eq!(batch.now(), Pushed { present: 0, total: 3, queued: 3, failed: 0, uploaded: 0 });
        batch.update(|p| {
            p.queued -= 1;
            p.present += 1;
        });
        let waiting = {
            let batch = batch.clone();
            tokio::spawn(async move { batch.finished().await })
        };
        batch.update(|p| {
            p.queued -= 1;
            p.present += 1;
        });
        assert!(!waiting.is_finished());
        batch.update(|p| {
            p.queued -= 1;
            p.failed += 1;
        });
        let end = waiting.await.unwrap();
        assert_eq!(end, Pushed { present: 2, total: 3, queued: 0, failed: 1, uploaded: 0 });
        // A batch with nothing to upload has ended already.
        assert_eq!(Batch::new(0).0.finished().await.total, 0);
    }

    fn info(name: &str, references: &[&str]) -> Arc<PathInfo> {
        let path = format!("/nix/store/{}-{name}", "0".repeat(32).replacen('0', &name.len().to_string(), 1));
        Arc::new(PathInfo {
            path: crate::nix::store_path::StorePath::from_absolute("/nix/store", &path).unwrap(),
            nar_hash: String::new(),
            nar_size: 0,
            references: references.iter().map(|r| r.to_string()).collect(),
            deriver: None,
            sigs: Vec::new(),
            ca: None,
        })
    }

    #[test]
    fn narinfos_are_published_references_first() {
        let system = info("system", &[]);
        let mid = info("mid", &[]);
        let big = info("big", &[]);
        let (s, m, b) = (system.path.to_string(), mid.path.to_string(), big.path.to_string());
        // system → mid → big, a self-reference, and a reference outside the set.
        let system = info("system", &[&s, &m, "00000000000000000000000000000000-elsewhere"]);
        let mid = info("mid", &[&b, &m]);
        let big = info("big", &[]);
        let order = topological(vec![system, mid, big]);
        let names: Vec<String> = order.iter().map(|p| p.path.to_string()).collect();
        assert_eq!(names, [b.clone(), m.clone(), s.clone()]);
        // A cycle (never in a store, but never a hang): every path comes out once.
        let a = info("a", &[&b]);
        let b2 = info("big", &[&a.path.to_string()]);
        assert_eq!(topological(vec![a, b2]).len(), 2);
    }
}
