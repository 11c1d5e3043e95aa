//! The NAR (Nix ARchive) framing: the tokens Nix writes, as bytes.
//!
//! Pure: this module never touches the filesystem. `store::nar_fs` walks a store path and calls
//! these functions for the framing around file contents; [`Node`] encodes an in-memory tree
//! (for tests and benchmarks) with the same functions, so both always agree.

use std::collections::BTreeMap;

/// The magic string a NAR starts with.
pub const MAGIC: &[u8] = b"nix-archive-1";

/// Zero bytes needed after `len` bytes to reach a multiple of 8.
pub const fn padding(len: u64) -> u64 {
    (8 - (len % 8)) % 8
}

/// Appends a NAR string: u64 little-endian length, the bytes, zero padding to 8.
pub fn put_str(buf: &mut Vec<u8>, s: &[u8]) {
    buf.extend_from_slice(&(s.len() as u64).to_le_bytes());
    buf.extend_from_slice(s);
    buf.extend_from_slice(&[0u8; 8][..padding(s.len() as u64) as usize]);
}

/// The archive header and the opening of the root node.
pub fn put_archive_start(buf: &mut Vec<u8>) {
    put_str(buf, MAGIC);
}

/// Opens a node: `( type`.
pub fn put_node_open(buf: &mut Vec<u8>) {
    put_str(buf, b"(");
    put_str(buf, b"type");
}

/// Closes a node (and the archive, after the root): `)`.
pub fn put_node_close(buf: &mut Vec<u8>) {
    put_str(buf, b")");
}

/// A regular file's framing up to its contents; the caller then writes `size` bytes,
/// [`padding`]`(size)` zero bytes, and [`put_node_close`].
pub fn put_regular_header(buf: &mut Vec<u8>, executable: bool, size: u64) {
    put_str(buf, b"regular");
    if executable {
        put_str(buf, b"executable");
        put_str(buf, b"");
    }
    put_str(buf, b"contents");
    buf.extend_from_slice(&size.to_le_bytes());
}

/// A whole symlink node body (after [`put_node_open`]), including its close.
pub fn put_symlink(buf: &mut Vec<u8>, target: &[u8]) {
    put_str(buf, b"symlink");
    put_str(buf, b"target");
    put_str(buf, target);
    put_node_close(buf);
}

/// A directory node body start; entries follow, then [`put_node_close`].
pub fn put_directory(buf: &mut Vec<u8>) {
    put_str(buf, b"directory");
}

/// Opens a directory entry up to its node: `entry ( name <name> node`.
pub fn put_entry_open(buf: &mut Vec<u8>, name: &[u8]) {
    put_str(buf, b"entry");
    put_str(buf, b"(");
    put_str(buf, b"name");
    put_str(buf, name);
    put_str(buf, b"node");
}

/// True for a name NAR may carry: not empty, `.` or `..`, and without `/` or NUL.
pub fn is_valid_entry_name(name: &[u8]) -> bool {
    !name.is_empty() && name != b"." && name != b".." && !name.iter().any(|&c| c == b'/' || c == 0)
}

/// An in-memory file system tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    Regular {
        executable: bool,
        contents: Vec<u8>,
    },
    Symlink {
        target: Vec<u8>,
    },
    /// Entries keyed by raw name bytes; a `BTreeMap` gives NAR's byte order.
    Directory(BTreeMap<Vec<u8>, Node>),
}

impl Node {
    /// Encodes the tree as a complete NAR.
    pub fn to_nar(&self) -> Vec<u8> {
        let mut buf = Vec::new();
        put_archive_start(&mut buf);
        self.encode(&mut buf);
        buf
    }

    fn encode(&self, buf: &mut Vec<u8>) {
        put_node_open(buf);
        match self {
            Node::Regular { executable, contents } => {
                put_regular_header(buf, *executable, contents.len() as u64);
                buf.extend_from_slice(contents);
                buf.extend_from_slice(&[0u8; 8][..padding(contents.len() as u64) as usize]);
                put_node_close(buf);
            }
            Node::Symlink { target } => put_symlink(buf, target),
            Node::Directory(entries) => {
                put_directory(buf);
                for (name, node) in entries {
                    put_entry_open(buf, name);
                    node.encode(buf);
                    put_node_close(buf);
                }
                put_node_close(buf);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_file_matches_nix_layout() {
        let nar = Node::Regular { executable: false, contents: b"Hello, Nix!\n".to_vec() }.to_nar();
        assert_eq!(nar.len(), 128);
        // The contents start at offset 96, as the golden `.ls` says.
        assert_eq!(&nar[96..108], b"Hello, Nix!\n");
    }

    #[test]
    fn entry_names() {
        for bad in [&b""[..], b".", b"..", b"a/b", b"a\0b"] {
            assert!(!is_valid_entry_name(bad), "{bad:?}");
        }
        assert!(is_valid_entry_name(b"..."));
        assert!(is_valid_entry_name(b"\xff"));
    }
}
