//! A store path as a pull-based NAR byte source: [`NarReader`] implements [`Read`] and keeps
//! its place in the walk as data (a stack of open directories), not as a thread's call stack.
//!
//! That is what lets a NAR stream hold no thread while its client is not reading: each chunk is
//! produced by one short blocking call, and between calls the walk is just this struct. It
//! follows the same rules as [`super::nar_fs::walk`] (names only from `read_dir`, every open
//! relative to its directory, never through a symlink) and produces the same bytes, which the
//! tests check against `nix-store --dump`'s golden NARs.
//!
//! Per entry it makes as few syscalls as it safely can, since a toolchain has 50,000 of them:
//! the directory listing's type picks the call (a file is opened and `fstat`ed, a directory
//! opened, a symlink read; no separate `stat`), and each call checks the type again itself.

use std::collections::VecDeque;
use std::ffi::CString;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use rustix::fs::{AtFlags, FileType, Mode, OFlags};

use crate::nix::nar;

/// An open directory of the walk and the entries of it still to visit.
struct DirFrame {
    fd: OwnedFd,
    /// Each entry's name and the type its directory listing gave.
    names: VecDeque<(CString, FileType)>,
}

/// A regular file whose contents come next.
struct Contents {
    /// Where it was found: its directory (`None`: the root's parent) and its name.
    dir_index: Option<usize>,
    name: CString,
    size: u64,
    /// Contents bytes already produced (or skipped).
    done: u64,
    file: Option<File>,
}

/// The NAR of one store path, produced on demand. Reads may start at an offset
/// ([`NarReader::skip_to`]): files before it are passed over by size, without being opened.
pub struct NarReader {
    root_parent: OwnedFd,
    root_name: Option<CString>,
    stack: Vec<DirFrame>,
    /// Framing bytes produced and not yet read.
    framing: Vec<u8>,
    framing_pos: usize,
    contents: Option<Contents>,
    /// The NAR offset of the next byte produced.
    pos: u64,
    /// Bytes before this offset are dropped instead of returned.
    skip_until: u64,
    finished: bool,
}

/// Opens the entry `name` of `dir` for reading, never through a symlink (`O_NOFOLLOW`), with
/// `extra` flags (`O_DIRECTORY` for a directory, `O_NONBLOCK` for a file, so that a FIFO could
/// never block the open).
fn open_entry(dir: BorrowedFd<'_>, name: &CString, extra: OFlags) -> io::Result<OwnedFd> {
    let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | extra;
    Ok(rustix::fs::openat(dir, name.as_c_str(), flags, Mode::empty())?)
}

/// The open directory the entries of frame `dir_index` are in (`None`: the root's parent).
fn dir_fd<'a>(stack: &'a [DirFrame], root_parent: &'a OwnedFd, dir_index: Option<usize>) -> BorrowedFd<'a> {
    match dir_index.and_then(|i| stack.get(i)) {
        Some(frame) => frame.fd.as_fd(),
        None => root_parent.as_fd(),
    }
}

fn invalid(msg: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

impl NarReader {
    /// Opens `root`'s parent directory; nothing else happens until the first read.
    pub fn open(root: &Path) -> io::Result<Self> {
        let parent = root.parent().ok_or_else(|| invalid("no parent directory"))?;
        let name = root.file_name().ok_or_else(|| invalid("no file name"))?;
        let name = CString::new(name.as_bytes()).map_err(|_| invalid("NUL in a path"))?;
        let root_parent =
            rustix::fs::open(parent, OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())?;
        let mut framing = Vec::with_capacity(256);
        nar::put_archive_start(&mut framing);
        Ok(Self {
            root_parent,
            root_name: Some(name),
            stack: Vec::new(),
            framing,
            framing_pos: 0,
            contents: None,
            pos: 0,
            skip_until: 0,
            finished: false,
        })
    }

    /// Starts producing at NAR offset `offset` (before the first read).
    pub fn skip_to(&mut self, offset: u64) {
        self.skip_until = offset;
    }

    /// Produces the next framing (and maybe a file to read); false at the end of the NAR.
    fn advance(&mut self) -> io::Result<bool> {
        self.framing.clear();
        self.framing_pos = 0;
        if let Some(name) = self.root_name.take() {
            self.visit(None, name, FileType::Unknown)?;
            return Ok(true);
        }
        let Some(top) = self.stack.last_mut() else { return Ok(false) };
        match top.names.pop_front() {
            Some((name, listed)) => {
                nar::put_entry_open(&mut self.framing, name.to_bytes());
                self.visit(Some(self.stack.len() - 1), name, listed)?;
            }
            None => {
                // The directory node ends, and with it the parent's entry (if any).
                self.stack.pop();
                nar::put_node_close(&mut self.framing);
                if !self.stack.is_empty() {
                    nar::put_node_close(&mut self.framing);
                }
            }
        }
        Ok(true)
    }

    /// Frames the node `name` in directory `dir_index` (`listed`: the type its directory
    /// listing gave); a regular file's contents come next.
    ///
    /// The listed type only picks the first call; each call checks the type again itself
    /// (`O_NOFOLLOW` and `fstat` for a file, `O_DIRECTORY` for a directory, `readlinkat` for a
    /// symlink), so a wrong or stale type is an error, never a file read the wrong way. Where
    /// the listing gives no type, or while skipping to an offset (files are then passed over
    /// unopened), `statat` decides.
    fn visit(&mut self, dir_index: Option<usize>, name: CString, listed: FileType) -> io::Result<()> {
        let in_dir = dir_index.is_some();
        let dir = dir_fd(&self.stack, &self.root_parent, dir_index);
        let skipping = self.skip_until > self.pos;
        let (kind, stat, file) = match listed {
            FileType::RegularFile if !skipping => {
                let fd = open_entry(dir, &name, OFlags::NONBLOCK)?;
                let st = rustix::fs::fstat(&fd)?;
                (FileType::from_raw_mode(st.st_mode), Some(st), Some(File::from(fd)))
            }
            FileType::Directory | FileType::Symlink => (listed, None, None),
            _ => {
                let st = rustix::fs::statat(dir, name.as_c_str(), AtFlags::SYMLINK_NOFOLLOW)?;
                (FileType::from_raw_mode(st.st_mode), Some(st), None)
            }
        };
        nar::put_node_open(&mut self.framing);
        match (kind, stat) {
            (FileType::RegularFile, Some(st)) => {
                let size = u64::try_from(st.st_size).map_err(|_| io::Error::other("negative file size"))?;
                nar::put_regular_header(&mut self.framing, st.st_mode & 0o100 != 0, size);
                self.contents = Some(Contents { dir_index, name, size, done: 0, file });
            }
            (FileType::Symlink, _) => {
                let target = rustix::fs::readlinkat(dir, name.as_c_str(), Vec::new())?;
                nar::put_symlink(&mut self.framing, target.as_bytes());
                if in_dir {
                    nar::put_node_close(&mut self.framing);
                }
            }
            (FileType::Directory, _) => {
                let fd = open_entry(dir, &name, OFlags::DIRECTORY)?;
                let names = super::nar_fs::sorted_entries(&fd)?;
                nar::put_directory(&mut self.framing);
                self.stack.push(DirFrame { fd, names: names.into() });
            }
            _ => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "a store path holds a file that is not regular, a directory or a symlink",
                ));
            }
        }
        Ok(())
    }

    /// Reads file contents into `out`; returns 0 once the file is done (its closing framing is
    /// then queued).
    fn read_contents(&mut self, out: Out<'_>) -> io::Result<usize> {
        let Some(c) = self.contents.as_mut() else { return Ok(0) };
        let left = c.size - c.done;
        // Skip what lies before the wanted offset without reading it.
        let skip = self.skip_until.saturating_sub(self.pos).min(left);
        if skip > 0 && c.file.is_none() {
            c.done += skip;
            self.pos += skip;
        }
        let left = c.size - c.done;
        if left > 0 {
            if c.file.is_none() {
                let dir = dir_fd(&self.stack, &self.root_parent, c.dir_index);
                let fd = open_entry(dir, &c.name, OFlags::NONBLOCK)?;
                let mut file = File::from(fd);
                if c.done > 0 {
                    file.seek(SeekFrom::Start(c.done))?;
                }
                c.file = Some(file);
            }
            let Some(file) = c.file.as_mut() else { return Ok(0) };
            let n = match out {
                Out::Slice(out) => {
                    let want = left.min(out.len() as u64) as usize;
                    file.read(&mut out[..want])?
                }
                // Into the vector's spare capacity, which is never zeroed first: one read(2)
                // of up to the whole spare capacity. More than `left` bytes means the file
                // grew under us: never send that.
                Out::Vec(v) => {
                    let before = v.len();
                    let n = rustix::io::read(&*file, rustix::buffer::spare_capacity(v))?;
                    if n as u64 > left {
                        v.truncate(before);
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            format!("{}: changed while read", c.name.to_string_lossy()),
                        ));
                    }
                    n
                }
            };
            if n == 0 {
                // A file shorter than its metadata said changed under us: never pad it.
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("{}: changed while read", c.name.to_string_lossy()),
                ));
            }
            c.done += n as u64;
            self.pos += n as u64;
            return Ok(n);
        }
        let size = c.size;
        let in_dir = c.dir_index.is_some();
        self.contents = None;
        self.framing.clear();
        self.framing_pos = 0;
        self.framing.extend_from_slice(&[0u8; 8][..nar::padding(size) as usize]);
        nar::put_node_close(&mut self.framing);
        if in_dir {
            nar::put_node_close(&mut self.framing);
        }
        Ok(0)
    }

    /// The next bytes of the NAR into `out`, dropping those before `skip_until`.
    fn next_bytes(&mut self, out: &mut [u8]) -> io::Result<usize> {
        loop {
            if self.framing_pos < self.framing.len() {
                let avail = &self.framing[self.framing_pos..];
                let drop = (self.skip_until.saturating_sub(self.pos) as usize).min(avail.len());
                if drop > 0 {
                    self.framing_pos += drop;
                    self.pos += drop as u64;
                    continue;
                }
                let n = avail.len().min(out.len());
                out[..n].copy_from_slice(&avail[..n]);
                self.framing_pos += n;
                self.pos += n as u64;
                return Ok(n);
            }
            if self.contents.is_some() {
                let n = self.read_contents(Out::Slice(out))?;
                if n > 0 {
                    return Ok(n);
                }
                continue;
            }
            if self.finished || !self.advance()? {
                self.finished = true;
                return Ok(0);
            }
        }
    }
}

/// Where file contents go: a slice (`Read`), or a vector's spare capacity.
enum Out<'a> {
    Slice(&'a mut [u8]),
    Vec(&'a mut Vec<u8>),
}

impl NarReader {
    /// Appends the next NAR bytes to `v` until its capacity is full or the NAR ends, without
    /// zeroing the buffer first. For whole NARs (no `skip_to`).
    pub fn fill_vec(&mut self, v: &mut Vec<u8>) -> io::Result<()> {
        while v.len() < v.capacity() {
            if self.skip_until > self.pos {
                // Ranges take the general path.
                let mut tmp = vec![0u8; (v.capacity() - v.len()).min(64 << 10)];
                let n = self.next_bytes(&mut tmp)?;
                if n == 0 {
                    return Ok(());
                }
                v.extend_from_slice(&tmp[..n]);
                continue;
            }
            if self.framing_pos < self.framing.len() {
                let avail = &self.framing[self.framing_pos..];
                let n = avail.len().min(v.capacity() - v.len());
                v.extend_from_slice(&avail[..n]);
                self.framing_pos += n;
                self.pos += n as u64;
                continue;
            }
            if self.contents.is_some() {
                self.read_contents(Out::Vec(v))?;
                continue;
            }
            if self.finished || !self.advance()? {
                self.finished = true;
                return Ok(());
            }
        }
        Ok(())
    }
}

impl Read for NarReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        self.next_bytes(out)
    }
}

/// Reads until `buf` is full or the source ends; returns the bytes read.
pub(crate) fn fill(src: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match src.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn golden(name: &str) -> Vec<u8> {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/nix-wire/nars").join(name);
        fs::read(p).unwrap()
    }

    fn read_all(root: &Path, from: u64, buf_size: usize) -> Vec<u8> {
        let mut r = NarReader::open(root).unwrap();
        r.skip_to(from);
        let mut out = Vec::new();
        let mut buf = vec![0u8; buf_size];
        loop {
            let n = r.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
        }
        out
    }

    /// The test tree on disk (under the returned directory) and its NAR from `nix-store --dump`.
    fn golden_tree() -> (tempfile::TempDir, std::path::PathBuf, Vec<u8>) {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("tree");
        fs::create_dir(&root).unwrap();
        super::super::nar_fs::test_tree::make_tree(&root);
        (dir, root, golden("cdnf7sl3i8vngkdz1zh3vqxzz3djw8wf-tree.nar"))
    }

    #[test]
    fn matches_nix_dump_at_every_offset_and_read_size() {
        let (_dir, root, want) = golden_tree();
        for size in [1, 3, 8, 100, 4096] {
            assert!(read_all(&root, 0, size) == want, "read size {size}");
        }
        for from in 0..want.len() as u64 {
            assert!(read_all(&root, from, 7) == want[from as usize..], "from {from}");
        }
    }

    #[test]
    fn fill_vec_gives_the_same_bytes_at_every_capacity() {
        let (_dir, root, want) = golden_tree();
        for cap in [1, 7, 64, 1000, 1 << 20] {
            let mut r = NarReader::open(&root).unwrap();
            let mut out = Vec::new();
            loop {
                let mut v = Vec::with_capacity(cap);
                r.fill_vec(&mut v).unwrap();
                if v.is_empty() {
                    break;
                }
                out.extend_from_slice(&v);
            }
            assert!(out == want, "capacity {cap}");
        }
    }

    #[test]
    fn single_file_and_symlink_roots() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("f"), b"hello").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", dir.path().join("l")).unwrap();
        let want = nar::Node::Regular { executable: false, contents: b"hello".to_vec() }.to_nar();
        assert_eq!(read_all(&dir.path().join("f"), 0, 64), want);
        let link = read_all(&dir.path().join("l"), 0, 64);
        let text = String::from_utf8_lossy(&link);
        assert!(text.contains("/etc/passwd") && !text.contains("root:"));
    }

    #[test]
    fn special_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("s");
        let _l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let mut r = NarReader::open(&sock).unwrap();
        assert!(r.read_to_end(&mut Vec::new()).is_err());
    }

    #[test]
    fn a_fifo_inside_a_tree_is_refused_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("tree");
        fs::create_dir(&root).unwrap();
        fs::write(root.join("a"), b"before").unwrap();
        rustix::fs::mknodat(rustix::fs::CWD, root.join("b"), FileType::Fifo, Mode::from_raw_mode(0o600), 0).unwrap();
        // Nothing writes to the FIFO: opening it for reading would block forever.
        let err = NarReader::open(&root).unwrap().read_to_end(&mut Vec::new()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        let mut whole = Vec::with_capacity(1 << 20);
        assert!(NarReader::open(&root).unwrap().fill_vec(&mut whole).is_err());
    }
}
