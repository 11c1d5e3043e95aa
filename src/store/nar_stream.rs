//! A store path → a stream of its NAR bytes (or a range of them, or zstd of them).
//!
//! Pull-based: the stream holds a [`NarReader`] (the walk's place, as data) and produces one chunk
//! per short call on the NAR pool's own blocking threads, with one chunk read ahead. A client
//! that stops reading stops the production and holds no thread, only the walk's state and at
//! most [`CHUNKS_PER_STREAM`] chunk buffers. Chunks share a memory budget: one download gets
//! large chunks (few syscalls), many concurrent downloads get small ones, so memory stays flat
//! under load. Chunk buffers come back to one pool once they are sent, so streams reuse a few
//! buffers instead of page-faulting in fresh memory for every chunk.
//!
//! On-the-fly zstd is bounded too: its window and match tables are capped at [`ZSTD_MAX_LOG`],
//! which bounds the encoder's memory whatever the level (see docs/performance.md).

use std::future::Future;
use std::io::{self, Read};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use futures::Stream;
use tokio::task::JoinHandle;

use super::nar_reader::{NarReader, fill};

/// Bytes of chunk buffers that all streams together aim to stay under.
const BUFFER_BUDGET: usize = 16 << 20;
/// Chunk buffers a stream holds at most, counted for the budget: the one being sent, the one
/// read ahead, and two more hyper may still hold.
const CHUNKS_PER_STREAM: usize = 4;
/// Bytes of free chunk buffers the pool keeps at most.
const POOL_BYTES: usize = 16 << 20;
/// Chunk buffers are powers of two from `MIN_CHUNK` to `MAX_CHUNK`.
const MIN_CHUNK: usize = 16 << 10;
const MAX_CHUNK: usize = 1 << 20;
const CLASSES: usize = (MAX_CHUNK.trailing_zeros() - MIN_CHUNK.trailing_zeros() + 1) as usize;
/// The largest zstd window, hash and chain table logs on-the-fly compression uses: together they
/// bound an encoder's memory (about 13 MiB at level 19 instead of 85 MiB; see
/// docs/performance.md) at a small cost in ratio.
pub const ZSTD_MAX_LOG: u32 = 20;

/// zstd's own (chainLog, hashLog) for each level 1..=19, for inputs over 256 KiB (zstd's
/// `clevels.h`): capped at [`ZSTD_MAX_LOG`], never raised.
const ZSTD_TABLE_LOGS: [(u32, u32); 19] = [
    (13, 14),
    (15, 16),
    (16, 17),
    (18, 18),
    (18, 19),
    (18, 19),
    (19, 20),
    (19, 20),
    (20, 21),
    (21, 22),
    (21, 22),
    (22, 23),
    (22, 22),
    (22, 23),
    (23, 23),
    (22, 22),
    (23, 22),
    (23, 22),
    (24, 22),
];

/// More bytes than zstd makes of `n`: its `ZSTD_COMPRESSBOUND` and a margin for the frame.
fn zstd_bound(n: u64) -> u64 {
    let small = if n < 128 << 10 { ((128 << 10) - n) >> 11 } else { 0 };
    n.saturating_add(n >> 8).saturating_add(small).saturating_add(1024)
}

/// Streams running now.
static ACTIVE: AtomicUsize = AtomicUsize::new(0);

/// The chunk size for the next chunk: the budget shared by the running streams.
fn chunk_size() -> usize {
    let streams = ACTIVE.load(Ordering::Relaxed).max(1);
    (BUFFER_BUDGET / (streams * CHUNKS_PER_STREAM)).clamp(MIN_CHUNK, MAX_CHUNK)
}

/// Counts a running stream while it lives.
struct Active;

impl Active {
    fn new() -> Self {
        ACTIVE.fetch_add(1, Ordering::Relaxed);
        Active
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        ACTIVE.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What to send of the NAR.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// The NAR bytes `[start, end)`.
    Plain { start: u64, end: u64 },
    /// The whole NAR (`nar_size` bytes), zstd-compressed at this level.
    Zstd { level: i32, nar_size: u64 },
}

/// The blocking threads NAR chunks are produced on, apart from tokio's shared blocking pool
/// (database lookups, `.ls` walks), so that NAR streams can never starve them or be starved.
pub struct NarPool {
    runtime: Option<tokio::runtime::Runtime>,
}

impl NarPool {
    /// A pool of at most `threads` blocking threads.
    pub fn new(threads: usize) -> io::Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .max_blocking_threads(threads.max(1))
            .thread_name("hearth-nar")
            .build()?;
        Ok(Self { runtime: Some(runtime) })
    }

    fn spawn<F, T>(&self, f: F) -> Option<JoinHandle<T>>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        self.runtime.as_ref().map(|rt| rt.spawn_blocking(f))
    }
}

impl Drop for NarPool {
    fn drop(&mut self) {
        // Dropping a runtime may block, which is not allowed inside async code.
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// A blocking byte source.
pub type Source = Box<dyn Read + Send>;

/// What a stream produces chunks from: a whole NAR (filled without zeroing buffers first, into
/// buffers it reuses), or any reader (ranges, zstd, files) of at most `left` more bytes. Chunk
/// buffers are never larger than what can still come, and a stream whose last byte is out
/// reads nothing ahead.
enum Producer {
    Nar {
        reader: NarReader,
        left: u64,
    },
    /// A whole file of `left` bytes (a hot NAR), read the same way: no zeroing, no copy.
    File {
        file: std::fs::File,
        left: u64,
    },
    Read {
        source: Source,
        left: u64,
    },
}

impl Producer {
    fn read(source: Source, at_most: u64) -> Self {
        Producer::Read { source, left: at_most }
    }

    fn empty() -> Self {
        Self::read(Box::new(io::empty()), 0)
    }

    /// Nothing more can come.
    fn finished(&self) -> bool {
        match self {
            Producer::Nar { left, .. } | Producer::File { left, .. } | Producer::Read { left, .. } => *left == 0,
        }
    }
}

/// Free chunk buffers of every stream, by size class. A chunk's buffer comes back when the HTTP
/// layer drops the chunk (it has been written), so downloads reuse a few buffers instead of
/// allocating fresh memory for every chunk: buffers of 128 KiB and more are mapped by the
/// allocator itself (glibc's mmap threshold, which `main` fixes), and each new one is memory to
/// page-fault in and clear. At most [`POOL_BYTES`] are kept free.
struct Pool {
    classes: [Mutex<Vec<Vec<u8>>>; CLASSES],
    free: AtomicUsize,
}

static POOL: Pool = Pool { classes: [const { Mutex::new(Vec::new()) }; CLASSES], free: AtomicUsize::new(0) };

/// The class of a buffer of `capacity` bytes, if it is one of the pool's sizes.
fn class_of(capacity: usize) -> Option<usize> {
    let ok = capacity.is_power_of_two() && (MIN_CHUNK..=MAX_CHUNK).contains(&capacity);
    ok.then(|| (capacity.trailing_zeros() - MIN_CHUNK.trailing_zeros()) as usize)
}

/// The capacity of the next chunk's buffer when at most `left` more bytes can come: the chunk
/// budget rounded down to a class, or, for the last chunk, `left` rounded up to one (the
/// source ends first), so that a small NAR is one chunk.
fn chunk_capacity(left: u64) -> usize {
    let budget = chunk_size();
    if left <= budget as u64 { (left as usize).next_power_of_two().max(MIN_CHUNK) } else { 1 << budget.ilog2() }
}

impl Pool {
    /// An empty buffer of exactly `capacity` bytes' capacity (a class size): a free one, or a
    /// new one.
    fn take(&self, capacity: usize) -> Vec<u8> {
        if let Some(class) = class_of(capacity) {
            let free = self.classes[class].lock().unwrap_or_else(|e| e.into_inner()).pop();
            if let Some(buf) = free {
                self.free.fetch_sub(capacity, Ordering::Relaxed);
                return buf;
            }
        }
        Vec::with_capacity(capacity)
    }

    /// `buf` as a chunk, whose buffer comes back to the pool once it is dropped.
    fn chunk(&'static self, buf: Vec<u8>) -> Bytes {
        if class_of(buf.capacity()).is_none() {
            return Bytes::from(buf);
        }
        Bytes::from_owner(Chunk { buf, home: self })
    }

    fn give_back(&self, mut buf: Vec<u8>) {
        let Some(class) = class_of(buf.capacity()) else { return };
        if self.free.fetch_add(buf.capacity(), Ordering::Relaxed) + buf.capacity() > POOL_BYTES {
            self.free.fetch_sub(buf.capacity(), Ordering::Relaxed);
            return;
        }
        buf.clear();
        self.classes[class].lock().unwrap_or_else(|e| e.into_inner()).push(buf);
    }
}

/// A chunk with a pooled buffer.
struct Chunk {
    buf: Vec<u8>,
    home: &'static Pool,
}

impl AsRef<[u8]> for Chunk {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for Chunk {
    fn drop(&mut self) {
        self.home.give_back(std::mem::take(&mut self.buf));
    }
}

type Produced = (Producer, io::Result<Bytes>);

/// Opens the byte source for `encoding`: nothing is read yet.
fn open_source(path: &std::path::Path, encoding: Encoding) -> io::Result<Producer> {
    let mut reader = NarReader::open(path)?;
    Ok(match encoding {
        Encoding::Plain { start: 0, end } => Producer::Nar { reader, left: end },
        Encoding::Plain { start, end } => {
            reader.skip_to(start);
            let len = end.saturating_sub(start);
            Producer::read(Box::new(reader.take(len)), len)
        }
        Encoding::Zstd { level, nar_size } => {
            let mut enc = zstd::stream::read::Encoder::new(reader, level)?;
            // Known, the size shrinks the window and tables of a small NAR to fit it (an encoder
            // set up for a 20 KB NAR is set up in microseconds) and goes in the frame header.
            enc.set_pledged_src_size(Some(nar_size))?;
            enc.window_log(ZSTD_MAX_LOG)?;
            // Long-distance matching finds repeats across the capped window at little cost
            // (faster and smaller at level 1 on NARs, as harmonia found).
            enc.long_distance_matching(true)?;
            let index = usize::try_from(level.clamp(1, 19) - 1).unwrap_or(0);
            let (chain, hash) = ZSTD_TABLE_LOGS[index];
            enc.set_parameter(zstd::zstd_safe::CParameter::ChainLog(chain.min(ZSTD_MAX_LOG)))?;
            enc.set_parameter(zstd::zstd_safe::CParameter::HashLog(hash.min(ZSTD_MAX_LOG)))?;
            Producer::read(Box::new(enc), zstd_bound(nar_size))
        }
    })
}

/// Produces one chunk; an empty chunk is the end.
fn produce(mut producer: Producer) -> Produced {
    let result = match &mut producer {
        Producer::Nar { reader, left } => {
            // The walk fills the buffer whole: the last chunk's is exactly what is left (a range
            // from 0 ends there, short of the NAR's end), the others a pooled class.
            let last = *left <= chunk_size() as u64;
            let mut buf = if last { Vec::with_capacity(*left as usize) } else { POOL.take(chunk_capacity(*left)) };
            reader.fill_vec(&mut buf).map(|()| {
                *left = left.saturating_sub(buf.len() as u64);
                POOL.chunk(buf)
            })
        }
        Producer::File { file, left } => {
            // A pooled buffer, the last one too (the file ends before it is full).
            let mut buf = POOL.take(chunk_capacity(*left));
            fill_from_file(file, &mut buf).and_then(|()| {
                let n = buf.len() as u64;
                if n > *left {
                    return Err(io::Error::new(io::ErrorKind::InvalidData, "the file is longer than its size"));
                }
                // A short read is the end (a file shorter than its size: the body is short).
                *left = if n < buf.capacity() as u64 { 0 } else { *left - n };
                Ok(POOL.chunk(buf))
            })
        }
        Producer::Read { source, left } => {
            let want = (chunk_size() as u64).min(*left) as usize;
            let mut buf = POOL.take(chunk_capacity(*left));
            buf.resize(want, 0);
            fill(source, &mut buf).map(|n| {
                buf.truncate(n);
                // A short read is the end.
                *left = if n < want { 0 } else { *left - n as u64 };
                POOL.chunk(buf)
            })
        }
    };
    (producer, result)
}

/// Appends `file`'s next bytes to `buf` until its capacity is full or the file ends, into the
/// buffer's spare capacity (nothing zeroed first).
fn fill_from_file(file: &std::fs::File, buf: &mut Vec<u8>) -> io::Result<()> {
    while buf.len() < buf.capacity() {
        match rustix::io::read(file, rustix::buffer::spare_capacity(buf)) {
            Ok(0) => break,
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

type Opener = Box<dyn FnOnce() -> io::Result<Producer> + Send>;

/// A byte source whose first chunk is read already (see [`prime`]).
pub struct Primed {
    first: Bytes,
    rest: Producer,
}

/// Reads the first chunk of `source` (at most `at_most` bytes) now, blocking: called on the
/// blocking thread that opened it, so that a small file is ready whole after one hop off the
/// async threads instead of two.
pub fn prime(source: Source, at_most: u64) -> io::Result<Primed> {
    let (rest, first) = produce(Producer::read(source, at_most));
    Ok(Primed { first: first?, rest })
}

/// The same for a whole file of `size` bytes (a hot NAR), read without zeroing its buffers.
pub fn prime_file(file: std::fs::File, size: u64) -> io::Result<Primed> {
    let (rest, first) = produce(Producer::File { file, left: size });
    Ok(Primed { first: first?, rest })
}

/// Bytes from a blocking source (a NAR walk, a log file) as a stream of chunks, produced on
/// the NAR pool. `guard` (a temp root, a permit) lives as long as the stream. An `Err` item
/// ends it early (the client sees a short body).
pub struct NarStream {
    pool: std::sync::Arc<NarPool>,
    /// What it streams, for logs.
    what: String,
    /// A chunk produced before the stream was made ([`prime`]).
    ready: Option<Bytes>,
    /// The chunk being produced (read ahead), or the source while idle.
    in_flight: Option<JoinHandle<Produced>>,
    idle: Option<Producer>,
    open: Option<Opener>,
    done: bool,
    _active: Active,
    _guard: Box<dyn Send + Sync>,
}

impl NarStream {
    /// The NAR of the store path at `path` (on disk).
    pub fn new<G: Send + Sync + 'static>(
        pool: std::sync::Arc<NarPool>,
        path: PathBuf,
        encoding: Encoding,
        guard: G,
    ) -> Self {
        let what = path.display().to_string();
        Self::with_opener(pool, what, Box::new(move || open_source(&path, encoding)), Box::new(guard))
    }

    /// Any blocking byte source of at most `at_most` bytes, already open, with a guard that
    /// lives as long as the stream.
    pub fn from_reader<G: Send + Sync + 'static>(
        pool: std::sync::Arc<NarPool>,
        what: String,
        source: Source,
        at_most: u64,
        guard: G,
    ) -> Self {
        Self::with_opener(pool, what, Box::new(move || Ok(Producer::read(source, at_most))), Box::new(guard))
    }

    /// A source whose first chunk is read ([`prime`]).
    pub fn from_primed<G: Send + Sync + 'static>(
        pool: std::sync::Arc<NarPool>,
        what: String,
        primed: Primed,
        guard: G,
    ) -> Self {
        let mut s = Self::with_opener(pool, what, Box::new(|| Ok(Producer::empty())), Box::new(guard));
        s.open = None;
        s.done = primed.first.is_empty();
        s.ready = Some(primed.first).filter(|b| !b.is_empty());
        s.idle = Some(primed.rest);
        s
    }

    fn with_opener(pool: std::sync::Arc<NarPool>, what: String, open: Opener, guard: Box<dyn Send + Sync>) -> Self {
        Self {
            pool,
            what,
            ready: None,
            in_flight: None,
            idle: None,
            open: Some(open),
            done: false,
            _active: Active::new(),
            _guard: guard,
        }
    }

    /// Starts producing the next chunk on the pool.
    fn start_next(&mut self) -> bool {
        let job = if let Some(source) = self.idle.take() {
            self.pool.spawn(move || produce(source))
        } else if let Some(open) = self.open.take() {
            self.pool.spawn(move || match open() {
                Ok(source) => produce(source),
                Err(e) => (Producer::empty(), Err(e)),
            })
        } else {
            None
        };
        self.in_flight = job;
        self.in_flight.is_some()
    }
}

impl Stream for NarStream {
    type Item = io::Result<Bytes>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if let Some(first) = self.ready.take() {
            if self.idle.as_ref().is_none_or(Producer::finished) {
                self.done = true;
            } else {
                self.start_next();
            }
            return Poll::Ready(Some(Ok(first)));
        }
        if self.done {
            return Poll::Ready(None);
        }
        if self.in_flight.is_none() && !self.start_next() {
            self.done = true;
            return Poll::Ready(Some(Err(io::Error::other("the NAR pool is shut down"))));
        }
        let Some(job) = self.in_flight.as_mut() else { return Poll::Ready(None) };
        let (source, result) = match Pin::new(job).poll(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Ok(produced)) => produced,
            Poll::Ready(Err(e)) => (Producer::empty(), Err(io::Error::other(e))),
        };
        self.in_flight = None;
        match result {
            Ok(chunk) if chunk.is_empty() => {
                self.done = true;
                Poll::Ready(None)
            }
            Ok(chunk) if source.finished() => {
                self.done = true;
                Poll::Ready(Some(Ok(chunk)))
            }
            Ok(chunk) => {
                // Read one chunk ahead while this one is sent.
                self.idle = Some(source);
                self.start_next();
                Poll::Ready(Some(Ok(chunk)))
            }
            Err(e) => {
                self.done = true;
                if e.kind() != io::ErrorKind::BrokenPipe {
                    tracing::warn!(what = %self.what, err = %e, "stream failed");
                }
                Poll::Ready(Some(Err(e)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;
    use std::sync::Arc;

    /// Every item of `s`, in order.
    async fn items(mut s: NarStream) -> Vec<io::Result<Bytes>> {
        let mut out = Vec::new();
        while let Some(chunk) = s.next().await {
            out.push(chunk);
        }
        out
    }

    async fn collect(pool: &Arc<NarPool>, path: &std::path::Path, encoding: Encoding) -> Vec<u8> {
        let s = NarStream::new(pool.clone(), path.to_owned(), encoding, ());
        items(s).await.into_iter().flat_map(|c| c.unwrap().to_vec()).collect()
    }

    #[tokio::test]
    async fn plain_ranges_and_zstd_round_trip() {
        let pool = Arc::new(NarPool::new(2).unwrap());
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("tree");
        std::fs::create_dir(&root).unwrap();
        for i in 0..50 {
            std::fs::write(root.join(format!("f{i:02}")), vec![i as u8; 10_000 * i]).unwrap();
        }
        let whole = collect(&pool, &root, Encoding::Plain { start: 0, end: u64::MAX }).await;
        assert!(whole.len() > 12_000_000);
        let part = collect(&pool, &root, Encoding::Plain { start: 1_000_003, end: 5_000_001 }).await;
        assert!(part == whole[1_000_003..5_000_001]);
        let z = collect(&pool, &root, Encoding::Zstd { level: 3, nar_size: whole.len() as u64 }).await;
        assert!(zstd::decode_all(&z[..]).unwrap() == whole);
    }

    #[test]
    fn chunk_buffers_come_back_to_the_pool_up_to_its_bound() {
        let pool: &'static Pool = Box::leak(Box::new(Pool {
            classes: [const { Mutex::new(Vec::new()) }; CLASSES],
            free: AtomicUsize::new(0),
        }));
        let mut a = pool.take(MIN_CHUNK);
        a.extend_from_slice(b"chunk");
        let a_at = a.as_ptr();
        let chunk = pool.chunk(a);
        assert_eq!(&chunk[..], b"chunk");
        // Still being sent: a new buffer.
        let b = pool.take(MIN_CHUNK);
        assert_ne!(b.as_ptr(), a_at);
        drop(chunk);
        // Sent: the same memory, empty, for the next chunk of its class only.
        assert_eq!(pool.take(2 * MIN_CHUNK).capacity(), 2 * MIN_CHUNK);
        let again = pool.take(MIN_CHUNK);
        assert_eq!((again.as_ptr(), again.len(), again.capacity()), (a_at, 0, MIN_CHUNK));
        // Buffers of other sizes are left to the allocator.
        drop(pool.chunk(Vec::with_capacity(MIN_CHUNK + 1)));
        drop(pool.chunk(Vec::with_capacity(2 * MAX_CHUNK)));
        assert_eq!(pool.free.load(Ordering::Relaxed), 0);
        // No more than POOL_BYTES are kept free.
        let chunks: Vec<Bytes> = (0..POOL_BYTES / MAX_CHUNK + 3).map(|_| pool.chunk(pool.take(MAX_CHUNK))).collect();
        drop(chunks);
        assert_eq!(pool.free.load(Ordering::Relaxed), POOL_BYTES);
        let held: usize = pool.classes.iter().map(|c| c.lock().unwrap().iter().map(Vec::capacity).sum::<usize>()).sum();
        assert_eq!(held, POOL_BYTES);
        drop((b, again));
    }

    #[test]
    fn a_chunk_is_never_above_the_budget_and_a_small_nar_is_one_chunk() {
        assert_eq!(chunk_capacity(300), MIN_CHUNK);
        assert_eq!(chunk_capacity(20_036), 32 << 10);
        assert!(chunk_capacity(u64::MAX) <= chunk_size());
        assert!(chunk_capacity(u64::MAX).is_power_of_two());
    }

    /// Every chunk of a whole file streamed by [`prime_file`], as the stream gives them.
    async fn file_chunks(pool: &Arc<NarPool>, path: &std::path::Path, size: u64) -> Vec<io::Result<Bytes>> {
        let primed = match prime_file(std::fs::File::open(path).unwrap(), size) {
            Ok(p) => p,
            Err(e) => return vec![Err(e)],
        };
        items(NarStream::from_primed(pool.clone(), "file".into(), primed, ())).await
    }

    #[tokio::test]
    async fn a_whole_file_streams_exactly_its_size() {
        let pool = Arc::new(NarPool::new(2).unwrap());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hot");
        // Smaller than a chunk, exactly a chunk, and many chunks with a remainder.
        for size in [0, 300, MAX_CHUNK, 5 * MAX_CHUNK + 12_345] {
            let data: Vec<u8> = (0..size).map(|i| (i * 7 % 251) as u8).collect();
            std::fs::write(&path, &data).unwrap();
            let got: Vec<u8> =
                file_chunks(&pool, &path, size as u64).await.into_iter().flat_map(|c| c.unwrap().to_vec()).collect();
            assert!(got == data, "size {size}: {} bytes back", got.len());
        }
        // Longer than the size it was opened at: an error, never the bytes past it.
        std::fs::write(&path, vec![1u8; 1000]).unwrap();
        let chunks = file_chunks(&pool, &path, 900).await;
        assert!(chunks.iter().all(|c| c.as_ref().is_err()), "{chunks:?}");
        // Shorter: the stream ends short (the HTTP body checks it against its length).
        let got: usize = file_chunks(&pool, &path, 5000).await.into_iter().map(|c| c.unwrap().len()).sum();
        assert_eq!(got, 1000);
    }

    #[tokio::test]
    async fn a_missing_path_is_an_error_item() {
        let pool = Arc::new(NarPool::new(1).unwrap());
        let mut s = NarStream::new(pool, "/nonexistent/x".into(), Encoding::Plain { start: 0, end: 10 }, ());
        assert!(s.next().await.unwrap().is_err());
        assert!(s.next().await.is_none());
    }
}
