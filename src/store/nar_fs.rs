//! Walks a store path's metadata in NAR order, without following symlinks or reading files:
//! the `.ls` listing (sizes and NAR offsets).
//!
//! Blocking code, run in `spawn_blocking`. [`walk`] calls a [`Visitor`] with NAR framing bytes
//! and each file's size; [`listing`] turns that into a `.ls` tree. NAR bytes themselves come
//! from `nar_reader.rs`, which walks by the same rules. Names come only from `read_dir`, so
//! a walk never leaves the path it started at.

use std::collections::BTreeMap;
use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use rustix::fs::{AtFlags, Dir, FileType, Mode, OFlags};

use crate::nix::listing::ListingNode;
use crate::nix::nar;

/// What a walk reports, in NAR order.
pub(crate) trait Visitor {
    /// NAR framing bytes.
    fn framing(&mut self, bytes: &[u8]) -> io::Result<()>;
    /// A regular file's `size` bytes of contents (not read: only its size is reported); framing
    /// (and padding) is reported separately.
    fn contents(&mut self, size: u64, executable: bool) -> io::Result<()>;
    /// A symlink node (its framing is reported too).
    fn symlink(&mut self, _target: &[u8]) {}
    /// A directory node starts.
    fn directory(&mut self) {}
    /// The directory node started last ends.
    fn directory_end(&mut self) {}
    /// A directory entry named `name` starts; its node follows.
    fn enter(&mut self, _name: &[u8]) {}
    /// The current entry ends.
    fn leave(&mut self) {}
    /// True once the visitor needs nothing more (the end of a range).
    fn done(&self) -> bool {
        false
    }
}

/// Walks `root` as a whole NAR (header included). Every file is reached relative to its open
/// directory (`openat`, `statat`), which keeps path lookups to one name per file.
pub(crate) fn walk(root: &Path, v: &mut impl Visitor) -> io::Result<()> {
    let mut buf = Vec::with_capacity(256);
    nar::put_archive_start(&mut buf);
    v.framing(&buf)?;
    let parent = root.parent().ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no parent directory"))?;
    let name = root.file_name().ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no file name"))?;
    let name =
        CString::new(name.as_bytes()).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in a path"))?;
    let dir = rustix::fs::open(parent, OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())?;
    node(dir.as_fd(), &name, v, &mut buf)
}

fn node(dir: BorrowedFd<'_>, name: &CStr, v: &mut impl Visitor, buf: &mut Vec<u8>) -> io::Result<()> {
    let st = rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)?;
    buf.clear();
    nar::put_node_open(buf);
    match FileType::from_raw_mode(st.st_mode) {
        FileType::RegularFile => {
            let size = u64::try_from(st.st_size).map_err(|_| io::Error::other("negative file size"))?;
            let executable = st.st_mode & 0o100 != 0;
            nar::put_regular_header(buf, executable, size);
            v.framing(buf)?;
            v.contents(size, executable)?;
            buf.clear();
            buf.extend_from_slice(&[0u8; 8][..nar::padding(size) as usize]);
            nar::put_node_close(buf);
            v.framing(buf)
        }
        FileType::Symlink => {
            let target = rustix::fs::readlinkat(dir, name, Vec::new())?;
            nar::put_symlink(buf, target.as_bytes());
            v.symlink(target.as_bytes());
            v.framing(buf)
        }
        FileType::Directory => {
            let fd = rustix::fs::openat(
                dir,
                name,
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )?;
            nar::put_directory(buf);
            v.directory();
            v.framing(buf)?;
            for (n, _) in &sorted_entries(&fd)? {
                if v.done() {
                    return Ok(());
                }
                buf.clear();
                nar::put_entry_open(buf, n.to_bytes());
                v.enter(n.to_bytes());
                v.framing(buf)?;
                node(fd.as_fd(), n, v, buf)?;
                buf.clear();
                nar::put_node_close(buf);
                v.framing(buf)?;
                v.leave();
            }
            v.directory_end();
            buf.clear();
            nar::put_node_close(buf);
            v.framing(buf)
        }
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "a store path holds a file that is not regular, a directory or a symlink",
        )),
    }
}

/// The entries of an open directory, `.` and `..` left out, in NAR order (bytewise), each with
/// the type the directory listing gives (`Unknown` where the file system gives none): a hint
/// that saves a `stat`, never trusted on its own.
pub(crate) fn sorted_entries(dir: &std::os::fd::OwnedFd) -> io::Result<Vec<(CString, FileType)>> {
    let mut names = Vec::new();
    let mut entries = Dir::read_from(dir)?;
    while let Some(entry) = entries.read() {
        let entry = entry?;
        let n = entry.file_name();
        if n.to_bytes() != b"." && n.to_bytes() != b".." {
            names.push((n.to_owned(), entry.file_type()));
        }
    }
    names.sort_by(|a, b| a.0.to_bytes().cmp(b.0.to_bytes()));
    Ok(names)
}

/// Builds the `.ls` tree of `root` from metadata alone (no file is read), with the NAR's size.
pub(crate) fn listing(root: &Path) -> io::Result<(ListingNode, u64)> {
    let mut l = ListingVisitor::default();
    walk(root, &mut l)?;
    let size = l.offset;
    l.root.map(|r| (r, size)).ok_or_else(|| io::Error::other("a walk reported no node"))
}

#[derive(Default)]
struct ListingVisitor {
    offset: u64,
    /// Open directories, each with the name of the entry being filled in.
    stack: Vec<(BTreeMap<String, ListingNode>, Option<String>)>,
    root: Option<ListingNode>,
}

impl ListingVisitor {
    fn place(&mut self, node: ListingNode) {
        match self.stack.last_mut() {
            Some((entries, Some(name))) => {
                entries.insert(name.clone(), node);
            }
            _ => self.root = Some(node),
        }
    }
}

impl Visitor for ListingVisitor {
    fn framing(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.offset += bytes.len() as u64;
        Ok(())
    }
    fn contents(&mut self, size: u64, executable: bool) -> io::Result<()> {
        self.place(ListingNode::Regular { size, executable, nar_offset: self.offset });
        self.offset += size;
        Ok(())
    }
    fn symlink(&mut self, target: &[u8]) {
        self.place(ListingNode::Symlink { target: String::from_utf8_lossy(target).into_owned() });
    }
    fn directory(&mut self) {
        self.stack.push((BTreeMap::new(), None));
    }
    fn directory_end(&mut self) {
        if let Some((entries, _)) = self.stack.pop() {
            self.place(ListingNode::Directory { entries });
        }
    }
    fn enter(&mut self, name: &[u8]) {
        if let Some(top) = self.stack.last_mut() {
            top.1 = Some(String::from_utf8_lossy(name).into_owned());
        }
    }
    fn leave(&mut self) {
        if let Some(top) = self.stack.last_mut() {
            top.1 = None;
        }
    }
}

#[cfg(test)]
pub(crate) mod test_tree {
    use std::fs;
    use std::os::unix::fs::{PermissionsExt, symlink};
    use std::path::Path;

    /// The `tree` fixture of `../shared/nix-wire/make_fixtures.sh`, on disk.
    pub(crate) fn make_tree(root: &Path) {
        let w = |p: &str, c: &[u8]| fs::write(root.join(p), c).unwrap();
        fs::create_dir_all(root.join("sub/nested")).unwrap();
        fs::create_dir_all(root.join("bin")).unwrap();
        fs::create_dir_all(root.join("emptydir")).unwrap();
        w("README", b"tree root\n");
        w("sub/nested/deep.txt", b"deep\n");
        w("bin/run", b"#!/bin/sh\nexit 0\n");
        fs::set_permissions(root.join("bin/run"), fs::Permissions::from_mode(0o755)).unwrap();
        symlink("README", root.join("link")).unwrap();
        symlink("../README", root.join("sub/up")).unwrap();
        w("empty", b"");
        w("Zebra", b"Z\n");
        w("alpha", b"a\n");
        w("a-b", b"x");
        w("a.b", b"y");
    }
}

#[cfg(test)]
mod tests {
    use super::test_tree::make_tree;
    use super::*;
    use std::fs;
    use std::os::unix::fs::symlink;

    fn golden(name: &str) -> Vec<u8> {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/nix-wire/nars").join(name);
        fs::read(p).unwrap()
    }

    /// Counts the framing bytes and notes symlink targets.
    #[derive(Default)]
    struct Collect(Vec<u8>);
    impl Visitor for Collect {
        fn framing(&mut self, bytes: &[u8]) -> io::Result<()> {
            self.0.extend_from_slice(bytes);
            Ok(())
        }
        fn contents(&mut self, _: u64, _: bool) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn listing_matches_nix() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("tree");
        fs::create_dir(&root).unwrap();
        make_tree(&root);
        let (_, size) = listing(&root).unwrap();
        assert_eq!(size, golden("cdnf7sl3i8vngkdz1zh3vqxzz3djw8wf-tree.nar").len() as u64);

        let (node, size) = listing(&root).unwrap();
        assert_eq!(size, 2744);
        let ls = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../shared/nix-wire/nixcache-none/cdnf7sl3i8vngkdz1zh3vqxzz3djw8wf.ls");
        assert_eq!(crate::nix::listing::render(&node), fs::read_to_string(ls).unwrap());
    }

    #[test]
    fn symlink_root_is_a_symlink_node() {
        let dir = tempfile::tempdir().unwrap();
        symlink("/etc/passwd", dir.path().join("l")).unwrap();
        let mut c = Collect(Vec::new());
        walk(&dir.path().join("l"), &mut c).unwrap();
        let text = String::from_utf8_lossy(&c.0);
        assert!(text.contains("symlink") && text.contains("/etc/passwd"));
        assert!(!text.contains("root:"), "the link was followed");
    }

    #[test]
    fn special_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("s");
        let _l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        assert!(walk(&sock, &mut Collect(Vec::new())).is_err());
    }
}
