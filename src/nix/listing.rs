//! The `.ls` NAR listing: the JSON file tree Nix writes beside a NAR, with each file's offset.
//!
//! Pure: `store::nar_fs` fills a [`ListingNode`] tree while walking; this renders it exactly as
//! Nix does (`{"version":1,"root":…}`, compact, keys in Nix's order, entries sorted by name).

use std::collections::BTreeMap;

use serde::Serialize;

/// One node of a listing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum ListingNode {
    Regular {
        size: u64,
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        executable: bool,
        #[serde(rename = "narOffset")]
        nar_offset: u64,
    },
    Symlink {
        target: String,
    },
    Directory {
        entries: BTreeMap<String, ListingNode>,
    },
}

#[derive(Serialize)]
struct Listing<'a> {
    version: u32,
    root: &'a ListingNode,
}

/// Renders the listing document for `root`.
pub fn render(root: &ListingNode) -> String {
    // Serializing plain strings, integers and maps with string keys cannot fail.
    serde_json::to_string(&Listing { version: 1, root }).unwrap_or_default()
}
