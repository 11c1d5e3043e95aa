//! A store path's closure as the bucket's narinfos give it (their `References` and
//! `NarSize`): for what changed against a system another builder built, whose paths this
//! builder's store may not hold.

use std::collections::HashSet;

use super::{Bucket, BucketError, narinfo_key};
use crate::nix::narinfo::NarInfo;
use crate::nix::store_path::StorePath;

/// Narinfos read at once while walking a closure.
const CONCURRENCY: usize = 16;

/// The hash part of a store path (`/nix/store/<hash>-<name>`, or its basename as narinfos'
/// references name it).
pub(super) fn hash_of(path: &str) -> Option<String> {
    StorePath::from_basename(path.rsplit('/').next()?).map(|p| p.hash().as_str().to_owned())
}

impl Bucket {
    /// Every path of the closure of `path` (absolute, under `store_dir`) with its NAR size,
    /// read from the bucket's narinfos; `None` if one of them is missing or unreadable (a
    /// closure is whole or not known).
    pub async fn closure_sizes(&self, store_dir: &str, path: &str) -> Result<Option<Vec<(String, u64)>>, BucketError> {
        use futures::StreamExt;
        let Some(root) = hash_of(path) else { return Ok(None) };
        let mut seen: HashSet<String> = HashSet::from([root.clone()]);
        let mut frontier = vec![root];
        let mut out = Vec::new();
        while !frontier.is_empty() {
            let found: Vec<Result<Option<bytes::Bytes>, BucketError>> = futures::stream::iter(frontier.drain(..))
                .map(|hash| async move { self.get_at_most(&narinfo_key(&hash), super::MAX_NARINFO).await })
                .buffer_unordered(CONCURRENCY)
                .collect()
                .await;
            for text in found {
                let Some(text) = text? else { return Ok(None) };
                let Some(info) = NarInfo::parse(&String::from_utf8_lossy(&text)) else { return Ok(None) };
                if StorePath::from_absolute(store_dir, &info.store_path).is_none() {
                    return Ok(None);
                }
                for r in &info.references {
                    if let Some(h) = hash_of(r)
                        && seen.insert(h.clone())
                    {
                        frontier.push(h);
                    }
                }
                out.push((info.store_path, info.nar_size));
            }
        }
        Ok(Some(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_of_paths_and_basenames() {
        let hash = Some("0qmwlny41nap6ccq7xi471zj6m58b530".to_owned());
        assert_eq!(hash_of("/nix/store/0qmwlny41nap6ccq7xi471zj6m58b530-a"), hash);
        assert_eq!(hash_of("0qmwlny41nap6ccq7xi471zj6m58b530-a"), hash);
        assert_eq!(hash_of("/nix/store/short-a"), None);
    }
}
