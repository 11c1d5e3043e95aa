//! Opening files hearth is told about (keys, seeds, build logs) safely: regular files only, and
//! a word when a secret one is readable by others.
//!
//! A FIFO, a device or a directory at such a path is refused at once instead of blocking or
//! being read without end, and what is read into memory is capped.

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Opens `path` for reading if it is a regular file (a symlink to one is followed; the open
/// never blocks, as it would on a FIFO).
pub fn open(path: &Path) -> io::Result<File> {
    let f = OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC).open(path)?;
    if !f.metadata()?.is_file() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "not a regular file"));
    }
    Ok(f)
}

/// Warns (naming the file, never its contents) when a secret `what` at `path` can be read by
/// other users than its owner.
pub fn warn_if_readable_by_others(path: &Path, what: &str) {
    use std::os::unix::fs::PermissionsExt;
    if std::fs::metadata(path).is_ok_and(|m| m.permissions().mode() & 0o077 != 0) {
        tracing::warn!(file = %path.display(), "{what} file is readable by other users; chmod 600 it");
    }
}

/// Reads a small regular text file whole: at most `limit` bytes.
pub fn read_to_string(path: &Path, limit: u64) -> io::Result<String> {
    let mut text = String::new();
    open(path)?.take(limit + 1).read_to_string(&mut text)?;
    if text.len() as u64 > limit {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("larger than {limit} bytes")));
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fifos_directories_and_large_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        use rustix::fs::{CWD, FileType, Mode, mknodat};
        mknodat(CWD, &fifo, FileType::Fifo, Mode::from_raw_mode(0o600), 0).unwrap();
        assert!(read_to_string(&fifo, 100).is_err());
        assert!(read_to_string(dir.path(), 100).is_err());
        let big = dir.path().join("big");
        std::fs::write(&big, "x".repeat(101)).unwrap();
        assert!(read_to_string(&big, 100).is_err());
        assert_eq!(read_to_string(&big, 101).unwrap().len(), 101);
    }
}
