//! `hearth bucket gc`: what the bucket keeps is the closure of every kept generation of every
//! host in the fleet record (all builders' hosts, with a shared record), followed through the
//! bucket's own narinfos, plus whatever was written within a grace period (an upload or a build
//! in progress). Everything else goes: narinfos first (so no narinfo ever points at a deleted
//! NAR), then the NARs no kept narinfo names.

use std::collections::HashSet;

use super::{Bucket, BucketError, narinfo_key};
use crate::nix::narinfo::NarInfo;

/// What a collection found and did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// Store paths kept as live (reachable from a kept generation).
    pub live: usize,
    /// Objects kept only because they are recent.
    pub recent: usize,
    pub narinfos_deleted: usize,
    pub nars_deleted: usize,
    pub bytes_deleted: u64,
    /// The keys deleted (or, in a dry run, that would be), narinfos first.
    pub deleted: Vec<String>,
    /// Kept systems whose narinfo the bucket lacks: their closures cannot be read, so nothing
    /// was collected.
    pub unreadable_roots: Vec<String>,
}

use super::closure::hash_of;

/// The bucket key of the NAR a narinfo names (its URL without a query).
fn nar_of(info: &NarInfo) -> String {
    info.url.split('?').next().unwrap_or(&info.url).to_owned()
}

/// Collects `bucket`, keeping the closures of `roots` (store paths) and objects written after
/// `keep_after` (unix seconds). With `dry_run` nothing is deleted; the report says what would be.
pub async fn collect(bucket: &Bucket, roots: &[String], keep_after: i64, dry_run: bool) -> Result<Report, BucketError> {
    let objects = bucket.list().await?;
    let mut report = Report::default();
    // The live closure, through the bucket's narinfos. A narinfo that cannot be read for a
    // reason other than its absence stops the collection: nothing is deleted on a guess.
    let mut live: HashSet<String> = HashSet::new();
    let mut live_nars: HashSet<String> = HashSet::new();
    let mut todo: Vec<String> = roots.iter().filter_map(|p| hash_of(p)).collect();
    let root_hashes: HashSet<String> = todo.iter().cloned().collect();
    while let Some(hash) = todo.pop() {
        if !live.insert(hash.clone()) {
            continue;
        }
        let Some(text) = bucket.get(&narinfo_key(&hash)).await? else {
            // A kept system not (yet, or no longer) in the bucket: its closure is unknown here,
            // and what it references may be what a push is adopting this moment.
            if root_hashes.contains(&hash) {
                report.unreadable_roots.push(hash);
            }
            continue;
        };
        let Some(info) = NarInfo::parse(&String::from_utf8_lossy(&text)) else { continue };
        live_nars.insert(nar_of(&info));
        todo.extend(info.references.iter().filter_map(|r| hash_of(r)));
    }
    report.live = live.len();
    if !report.unreadable_roots.is_empty() {
        return Ok(report);
    }
    // Narinfos: a dead one goes unless recent; a recent one keeps its NAR.
    let mut doomed_narinfos = Vec::new();
    for (key, size, at) in &objects {
        let Some(hash) = key.strip_suffix(".narinfo") else { continue };
        if live.contains(hash) {
            continue;
        }
        if *at >= keep_after {
            report.recent += 1;
            if let Some(text) = bucket.get(key).await?
                && let Some(info) = NarInfo::parse(&String::from_utf8_lossy(&text))
            {
                live_nars.insert(nar_of(&info));
            }
            continue;
        }
        doomed_narinfos.push((key.clone(), *size));
    }
    for (key, size) in &doomed_narinfos {
        if !dry_run {
            bucket.delete(key).await?;
        }
        report.narinfos_deleted += 1;
        report.bytes_deleted += size;
        report.deleted.push(key.clone());
    }
    for (key, size, at) in &objects {
        if !key.starts_with("nar/") || live_nars.contains(key) {
            continue;
        }
        if *at >= keep_after {
            report.recent += 1;
            continue;
        }
        if !dry_run {
            bucket.delete(key).await?;
        }
        report.nars_deleted += 1;
        report.bytes_deleted += size;
        report.deleted.push(key.clone());
    }
    Ok(report)
}
