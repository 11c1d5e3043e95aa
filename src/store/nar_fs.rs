//! Walks a store path on disk in NAR order, without following symlinks.
//!
//! Blocking code, run in `spawn_blocking`. [`walk`] calls a [`Visitor`] with NAR framing bytes
//! and file contents; `nar_stream` turns that into a byte stream (any range of it, without reading
//! what lies before the range) and [`listing`] into a `.ls` tree. Names come only from
//! `read_dir`, so a walk never leaves the path it started at.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use crate::nix::listing::ListingNode;
use crate::nix::nar;

/// What a walk reports, in NAR order.
pub(crate) trait Visitor {
    /// NAR framing bytes.
    fn framing(&mut self, bytes: &[u8]) -> io::Result<()>;
    /// A regular file's `size` bytes of contents; framing (and padding) is reported separately.
    fn contents(&mut self, path: &Path, size: u64, executable: bool) -> io::Result<()>;
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

/// Walks `root` as a whole NAR (header included).
pub(crate) fn walk(root: &Path, v: &mut impl Visitor) -> io::Result<()> {
    let mut buf = Vec::with_capacity(256);
    nar::put_archive_start(&mut buf);
    v.framing(&buf)?;
    node(root, v, &mut buf)
}

fn node(path: &Path, v: &mut impl Visitor, buf: &mut Vec<u8>) -> io::Result<()> {
    let meta = fs::symlink_metadata(path)?;
    let ft = meta.file_type();
    buf.clear();
    nar::put_node_open(buf);
    if ft.is_file() {
        let executable = meta.permissions().mode() & 0o100 != 0;
        nar::put_regular_header(buf, executable, meta.len());
        v.framing(buf)?;
        v.contents(path, meta.len(), executable)?;
        buf.clear();
        buf.extend_from_slice(&[0u8; 8][..nar::padding(meta.len()) as usize]);
        nar::put_node_close(buf);
        v.framing(buf)
    } else if ft.is_symlink() {
        let target = fs::read_link(path)?;
        nar::put_symlink(buf, target.as_os_str().as_bytes());
        v.symlink(target.as_os_str().as_bytes());
        v.framing(buf)
    } else if ft.is_dir() {
        nar::put_directory(buf);
        v.directory();
        v.framing(buf)?;
        let mut names: Vec<_> = fs::read_dir(path)?.map(|e| e.map(|e| e.file_name())).collect::<Result<_, _>>()?;
        names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        for name in names {
            if v.done() {
                return Ok(());
            }
            buf.clear();
            nar::put_entry_open(buf, name.as_bytes());
            v.enter(name.as_bytes());
            v.framing(buf)?;
            node(&path.join(&name), v, buf)?;
            buf.clear();
            nar::put_node_close(buf);
            v.framing(buf)?;
            v.leave();
        }
        v.directory_end();
        buf.clear();
        nar::put_node_close(buf);
        v.framing(buf)
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "a store path holds a file that is not regular, a directory or a symlink",
        ))
    }
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
    fn contents(&mut self, _: &Path, size: u64, executable: bool) -> io::Result<()> {
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
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    /// The `tree` fixture of `../shared/nix-wire/make_fixtures.sh`, on disk.
    fn make_tree(root: &Path) {
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

    fn golden(name: &str) -> Vec<u8> {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/nix-wire/nars").join(name);
        fs::read(p).unwrap()
    }

    struct Collect(Vec<u8>);
    impl Visitor for Collect {
        fn framing(&mut self, bytes: &[u8]) -> io::Result<()> {
            self.0.extend_from_slice(bytes);
            Ok(())
        }
        fn contents(&mut self, path: &Path, _: u64, _: bool) -> io::Result<()> {
            self.0.extend_from_slice(&fs::read(path)?);
            Ok(())
        }
    }

    #[test]
    fn walk_matches_nix_dump_and_listing() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("tree");
        fs::create_dir(&root).unwrap();
        make_tree(&root);
        let mut c = Collect(Vec::new());
        walk(&root, &mut c).unwrap();
        assert!(c.0 == golden("cdnf7sl3i8vngkdz1zh3vqxzz3djw8wf-tree.nar"), "NAR differs from nix-store --dump");

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
