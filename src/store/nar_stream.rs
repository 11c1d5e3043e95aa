//! A store path → a stream of its NAR bytes (or a range of them, or zstd of them).
//!
//! The walk runs on a blocking thread and hands chunks through a bounded channel, so a request
//! holds at most a chunk × ([`QUEUE`] + 2) bytes whatever the NAR's size. Chunks share a memory
//! budget: one download gets large chunks (few syscalls), many concurrent downloads get small
//! ones, so memory stays flat under load. A range skips the files before its start by size alone
//! and seeks into the first one it needs.

use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use bytes::{Bytes, BytesMut};
use tokio::sync::mpsc;

use super::nar_fs::{self, Entry, Visitor};

use std::sync::atomic::{AtomicUsize, Ordering};

/// Chunks queued between the walk and the socket.
const QUEUE: usize = 2;
/// Bytes of chunk buffers that all streams together aim to stay under.
const BUFFER_BUDGET: usize = 16 << 20;
const MIN_CHUNK: usize = 16 << 10;
const MAX_CHUNK: usize = 128 << 10;

/// Streams running now.
static ACTIVE: AtomicUsize = AtomicUsize::new(0);

/// The chunk size for the next chunk: the budget shared by the running streams.
fn chunk_size() -> usize {
    let streams = ACTIVE.load(Ordering::Relaxed).max(1);
    (BUFFER_BUDGET / (streams * (QUEUE + 2))).clamp(MIN_CHUNK, MAX_CHUNK)
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

/// A stream of NAR chunks; an `Err` item ends it early (the client sees a short body).
pub type NarReceiver = mpsc::Receiver<io::Result<Bytes>>;

/// What to send of the NAR.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// The NAR bytes `[start, end)`.
    Plain { start: u64, end: u64 },
    /// The whole NAR, zstd-compressed at this level.
    Zstd { level: i32 },
}

/// Starts streaming `path` on a blocking thread. `guard` (for example a temp root) lives until the
/// walk ends, whether it completes, fails, or the receiver is dropped.
pub fn spawn<G: Send + 'static>(path: PathBuf, encoding: Encoding, guard: G) -> NarReceiver {
    let (tx, rx) = mpsc::channel(QUEUE);
    let active = Active::new();
    tokio::task::spawn_blocking(move || {
        let _guard = guard;
        let _active = active;
        let result = match encoding {
            Encoding::Plain { start, end } => {
                let mut out = RangeOut { out: Chunker::new(tx.clone()), pos: 0, start, end };
                nar_fs::walk(&path, &mut out).and_then(|()| out.out.flush())
            }
            Encoding::Zstd { level } => zstd_walk(&path, level, tx.clone()),
        };
        if let Err(e) = result {
            // A closed receiver means the client went away: nothing to report.
            if e.kind() != io::ErrorKind::BrokenPipe {
                tracing::warn!(path = %path.display(), err = %e, "NAR stream failed");
                let _ = tx.blocking_send(Err(e));
            }
        }
    });
    rx
}

fn send(tx: &mpsc::Sender<io::Result<Bytes>>, bytes: Bytes) -> io::Result<()> {
    tx.blocking_send(Ok(bytes)).map_err(|_| io::Error::from(io::ErrorKind::BrokenPipe))
}

/// Collects bytes into chunks of the current budgeted size and hands full ones to the channel.
struct Chunker {
    tx: mpsc::Sender<io::Result<Bytes>>,
    buf: BytesMut,
    chunk: usize,
}

impl Chunker {
    fn new(tx: mpsc::Sender<io::Result<Bytes>>) -> Self {
        let chunk = chunk_size();
        Self { tx, buf: BytesMut::with_capacity(chunk), chunk }
    }

    /// Sends what is buffered, and sizes the next chunk by the budget as it is now.
    fn flush(&mut self) -> io::Result<()> {
        if !self.buf.is_empty() {
            self.chunk = chunk_size();
            let chunk = std::mem::replace(&mut self.buf, BytesMut::with_capacity(self.chunk)).freeze();
            send(&self.tx, chunk)?;
        }
        Ok(())
    }

    fn flush_if_full(&mut self) -> io::Result<()> {
        if self.buf.len() >= self.chunk { self.flush() } else { Ok(()) }
    }
}

/// Writes the part of the NAR inside `[start, end)` to the channel.
struct RangeOut {
    out: Chunker,
    /// The NAR offset of the next byte reported by the walk.
    pos: u64,
    start: u64,
    end: u64,
}

impl RangeOut {
    /// The part of `[pos, pos + len)` that lies in the range, relative to `pos`.
    fn overlap(&self, len: u64) -> Option<(u64, u64)> {
        let from = self.start.max(self.pos);
        let to = self.end.min(self.pos + len);
        (from < to).then(|| (from - self.pos, to - self.pos))
    }
}

impl Visitor for RangeOut {
    fn framing(&mut self, bytes: &[u8]) -> io::Result<()> {
        if let Some((a, b)) = self.overlap(bytes.len() as u64) {
            self.out.buf.extend_from_slice(&bytes[a as usize..b as usize]);
            self.out.flush_if_full()?;
        }
        self.pos += bytes.len() as u64;
        Ok(())
    }

    fn contents(&mut self, entry: &Entry<'_>, size: u64, _executable: bool) -> io::Result<()> {
        if let Some((a, b)) = self.overlap(size) {
            let mut file = entry.open()?;
            if a > 0 {
                file.seek(SeekFrom::Start(a))?;
            }
            let mut left = b - a;
            let out = &mut self.out;
            while left > 0 {
                out.flush_if_full()?;
                let room = (out.chunk - out.buf.len()) as u64;
                let want = left.min(room) as usize;
                let filled = out.buf.len();
                out.buf.resize(filled + want, 0);
                if let Err(e) = file.read_exact(&mut out.buf[filled..]) {
                    out.buf.truncate(filled);
                    // A file shorter than its metadata said changed under us: never pad it.
                    return Err(io::Error::new(e.kind(), format!("{}: {e}", entry.name())));
                }
                left -= want as u64;
            }
        }
        self.pos += size;
        Ok(())
    }

    fn done(&self) -> bool {
        self.pos >= self.end
    }
}

/// Compressed output goes to the channel in chunks.
impl Write for Chunker {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = data.len().min(self.chunk.saturating_sub(self.buf.len()).max(1));
        self.buf.extend_from_slice(&data[..n]);
        self.flush_if_full()?;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Chunker::flush(self)
    }
}

/// Feeds the whole NAR through a zstd encoder.
struct ZstdOut<W: Write> {
    enc: zstd::Encoder<'static, W>,
    scratch: Vec<u8>,
}

impl<W: Write> Visitor for ZstdOut<W> {
    fn framing(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.enc.write_all(bytes)
    }

    fn contents(&mut self, entry: &Entry<'_>, size: u64, _executable: bool) -> io::Result<()> {
        let mut file = entry.open()?.take(size);
        let mut copied = 0u64;
        loop {
            let n = file.read(&mut self.scratch)?;
            if n == 0 {
                break;
            }
            self.enc.write_all(&self.scratch[..n])?;
            copied += n as u64;
        }
        if copied != size {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, format!("{}: changed while read", entry.name())));
        }
        Ok(())
    }
}

fn zstd_walk(path: &Path, level: i32, tx: mpsc::Sender<io::Result<Bytes>>) -> io::Result<()> {
    let mut out = ZstdOut { enc: zstd::Encoder::new(Chunker::new(tx), level)?, scratch: vec![0; MIN_CHUNK] };
    nar_fs::walk(path, &mut out)?;
    out.enc.finish()?.flush()
}
