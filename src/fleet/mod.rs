//! The fleet's record: per repo and host, the last build (status, time, commit), the good
//! generations kept, the newest one's closure size and what changed against the one before.
//!
//! Written by the builder, read by the cache's fleet page (`GET /`): like the metrics registry,
//! a place both sides touch, never a call from one into the other. It holds nothing secret (no
//! keys, credentials or log lines).
//!
//! Where it is kept is one seam, [`Storage`]: a small JSON file under the state directory
//! (`file.rs`; one builder; a missing or corrupt file starts an empty record, which the builder
//! fills again from the GC roots and the store), or a JetStream key-value bucket that every
//! builder of the fleet writes and watches (`shared.rs`; one key per host), so each hearth
//! shows the whole fleet.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use serde::{Deserialize, Serialize};

use crate::nix::closure_diff::Changes;

mod file;
mod shared;

pub use shared::{open_shared, read_bucket, read_presences};

/// One good system of a host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Generation {
    /// Its number: 1 for the first recorded, counting up.
    pub number: u64,
    /// The toplevel store path.
    pub path: String,
    /// When it was built (unix seconds).
    pub built_at: i64,
    pub commit: Option<String>,
    /// The builder that built it (its `[builder] name`), where several share the record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub builder: Option<String>,
}

/// How a host's build ended, as the record and the metrics' `status` label spell it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BuildResult {
    Success,
    Failure,
}

impl BuildResult {
    pub const ALL: [BuildResult; 2] = [BuildResult::Success, BuildResult::Failure];

    pub fn as_str(self) -> &'static str {
        match self {
            BuildResult::Success => "success",
            BuildResult::Failure => "failure",
        }
    }

    pub fn is_success(self) -> bool {
        self == BuildResult::Success
    }
}

/// The last build of a host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastBuild {
    pub status: BuildResult,
    /// When it ended (unix seconds).
    pub at: i64,
    pub commit: Option<String>,
    /// A failure's error with the end of its log (bounded), for the page and MCP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The derivation that failed, where the log names it (its log is `/log/<drv>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_drv: Option<String>,
}

impl LastBuild {
    pub fn new(status: BuildResult, at: i64, commit: Option<String>) -> Self {
        Self { status, at, commit, error: None, failed_drv: None }
    }

    /// A failure with its error text: its last [`ERROR_LINES`] lines are kept, and the
    /// derivation Nix names as failed.
    pub fn failed(at: i64, commit: Option<String>, error: &str) -> Self {
        let lines: Vec<&str> = error.lines().collect();
        let tail = lines[lines.len().saturating_sub(ERROR_LINES)..].join("\n");
        let tail: String = tail.chars().rev().take(ERROR_CHARS).collect::<Vec<_>>().into_iter().rev().collect();
        Self { status: BuildResult::Failure, at, commit, error: Some(tail), failed_drv: failed_drv(error) }
    }
}

/// Lines and characters of a failure's error the record keeps.
pub const ERROR_LINES: usize = 20;
const ERROR_CHARS: usize = 4000;

/// The derivation a Nix error says failed: `builder for '/nix/store/…drv' failed` (Nix 2.8) or
/// `Cannot build '/nix/store/…drv'` (newer Nix); the last one named.
fn failed_drv(error: &str) -> Option<String> {
    error
        .rsplit(['\'', '`', '"', ' '])
        .filter(|w| w.starts_with("/nix/store/") && w.ends_with(".drv"))
        .find(|w| w.bytes().all(|b| b.is_ascii_alphanumeric() || b"/+-._?=".contains(&b)))
        .map(str::to_owned)
}

/// The newest build of a host on a branch other than the deploy branch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BranchBuild {
    #[serde(flatten)]
    pub build: LastBuild,
    pub out_path: Option<String>,
}

/// What the record says of one host.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostRecord {
    pub last_build: Option<LastBuild>,
    /// Oldest first; the last is the newest good system.
    pub generations: Vec<Generation>,
    /// The newest generation's closure: NAR bytes and paths.
    pub closure_bytes: Option<u64>,
    pub closure_paths: Option<usize>,
    /// The newest generation against the one before it.
    pub changes: Option<Changes>,
    /// Recent builds of other branches, by branch: never the host's state (version 2).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub branches: BTreeMap<String, BranchBuild>,
    /// How much of the newest system's closure the S3 bucket holds, where there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bucket: Option<BucketCopy>,
    /// The newest build of the deploy branch that ended after a newer commit's was recorded:
    /// built (and kept by its builder), never the host's state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub superseded: Option<BranchBuild>,
}

/// A good system of the deploy branch, as a builder offers it to the host's history.
#[derive(Debug, Clone)]
pub struct NewSystem {
    pub path: String,
    pub built_at: i64,
    pub commit: Option<String>,
    pub builder: Option<String>,
    /// The system `changes` compares it with (the host's newest when the builder looked).
    pub before: Option<String>,
    pub changes: Option<Changes>,
}

/// Where a build's result went in its host's history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placed {
    /// The host's state now: its newest generation (numbered), or its last failure.
    Current,
    /// A newer commit of the branch was recorded first: kept apart, the state unchanged.
    Superseded,
}

/// How much of a closure the bucket holds: `present + queued + failed = total`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pushed {
    /// Paths in the bucket.
    pub present: usize,
    /// Paths of the closure.
    pub total: usize,
    /// Paths waiting for their upload, or being uploaded.
    pub queued: usize,
    /// Paths whose upload failed for good this time (a later push tries them again).
    #[serde(default)]
    pub failed: usize,
    /// Of `present`, the paths uploaded by this push (the rest were there already).
    #[serde(default)]
    pub uploaded: usize,
}

/// A system's closure in the S3 bucket, as its push stands, and when.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BucketCopy {
    #[serde(flatten)]
    pub pushed: Pushed,
    /// When this was last true (unix seconds).
    pub at: i64,
}

/// What a builder knew of the deploy branch's history when it recorded a commit: the commits
/// that descend from it, its own last ancestors, and when it fetched the branch. A commit it
/// does not know was pushed after that fetch (newer) or dropped from the branch before it
/// (older); when the host's state was recorded tells them apart.
#[derive(Debug)]
pub struct BranchOrder {
    pub newer: std::collections::HashSet<String>,
    pub older: std::collections::HashSet<String>,
    /// When the branch was fetched (unix seconds, the recording builder's clock).
    pub fetched_at: i64,
}

/// How far two builders' clocks may be apart: a state recorded up to this long before a
/// builder's fetch may still be from a commit that fetch did not see.
pub const CLOCK_SKEW_SECONDS: i64 = 120;

/// How many of a commit's ancestors a [`BranchOrder`] lists.
pub const ORDER_ANCESTORS: usize = 1000;

impl BranchOrder {
    /// Whether `commit`, recorded at `at` (unix seconds, by any builder's clock), is newer in
    /// the branch's history than the commit this order is of.
    pub fn is_newer(&self, commit: &str, at: i64) -> bool {
        if self.newer.contains(commit) {
            return true;
        }
        if self.older.contains(commit) {
            return false;
        }
        // Unknown to the fetch: a state recorded after it may be from a commit pushed after
        // it; one recorded well before it is from a commit no longer on the branch.
        at > self.fetched_at - CLOCK_SKEW_SECONDS
    }
}

impl HostRecord {
    /// Whether the host's state (its newest generation, its last build) is from a commit newer
    /// than `commit` by `order`; never without an order (no history to order by).
    fn is_newer_than(&self, commit: Option<&str>, order: Option<&BranchOrder>) -> bool {
        let Some(order) = order else { return false };
        let newest = self.generations.last().and_then(|g| Some((g.commit.as_deref()?, g.built_at)));
        let last = self.last_build.as_ref().and_then(|b| Some((b.commit.as_deref()?, b.at)));
        [newest, last].into_iter().flatten().any(|(c, at)| Some(c) != commit && order.is_newer(c, at))
    }

    /// Records a deploy-branch build's result in the host's one history, whichever builder
    /// built it: a good system becomes the newest generation, numbered after every earlier one
    /// (none if it is the newest already), with its changes if they were worked out against
    /// the generation it follows; a failure becomes the last build. A result whose commit is
    /// older (in the branch's history, by `order`) than what the host's state is from is kept
    /// apart.
    pub fn place(
        &mut self,
        build: &LastBuild,
        system: Option<&NewSystem>,
        order: Option<&BranchOrder>,
        keep: usize,
    ) -> Placed {
        if self.is_newer_than(build.commit.as_deref(), order) {
            let out_path = system.map(|s| s.path.clone());
            self.superseded = Some(BranchBuild { build: build.clone(), out_path });
            return Placed::Superseded;
        }
        self.last_build = Some(build.clone());
        let Some(s) = system else { return Placed::Current };
        let newest = self.generations.last().map(|g| g.path.clone());
        if newest.as_deref() == Some(s.path.as_str()) {
            return Placed::Current;
        }
        let number = self.generations.iter().map(|g| g.number).max().unwrap_or(0) + 1;
        // A system the host had before (a rollback) moves up: one slot per system.
        self.generations.retain(|g| g.path != s.path);
        self.generations.push(Generation {
            number,
            path: s.path.clone(),
            built_at: s.built_at,
            commit: s.commit.clone(),
            builder: s.builder.clone(),
        });
        let from = self.generations.len().saturating_sub(keep.max(1));
        self.generations.drain(..from);
        match &s.changes {
            Some(c) if s.before == newest => self.set_changes(c),
            // Compared with another system than the one it follows (or not at all).
            _ => {
                self.changes = None;
                self.closure_bytes = s.changes.as_ref().map(|c| c.bytes_after);
                self.closure_paths = s.changes.as_ref().map(|c| c.paths_after);
            }
        }
        self.bucket = None;
        Placed::Current
    }

    /// Records the newest generation's changes and, with them, its closure's size.
    pub fn set_changes(&mut self, changes: &Changes) {
        self.closure_bytes = Some(changes.bytes_after);
        self.closure_paths = Some(changes.paths_after);
        self.changes = Some(changes.clone());
    }
}

/// `(repo, host)` → record.
pub type Hosts = BTreeMap<(String, String), HostRecord>;

/// One build the builder is running or has queued.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActiveBuild {
    pub repo: String,
    pub target: String,
    pub branch: String,
}

/// What the builder is doing now (not saved: it is gone with the process).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Activity {
    pub running: Option<ActiveBuild>,
    /// When the running build started (unix seconds).
    pub since: Option<i64>,
    pub queued: Vec<ActiveBuild>,
    /// With a JetStream queue: requests waiting in the stream for any builder (not yet taken).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub waiting_in_stream: Option<u64>,
}

/// A builder as the shared record shows it to every hearth: who it is, the keys it signs
/// with, what it runs, and when it last said so (every few seconds while it lives).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Presence {
    pub name: String,
    /// Its signing keys as a client's `trusted-public-keys` names them.
    #[serde(default)]
    pub public_keys: Vec<String>,
    /// When it last said it lives (unix seconds).
    pub seen_at: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub running: Option<ActiveBuild>,
    /// The running build's commit, once resolved, and when it started (unix seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<i64>,
    /// Requests it holds waiting in its own queue.
    #[serde(default)]
    pub queued: usize,
}

/// How long a builder that said nothing is still taken to live.
pub const PRESENCE_STALE_SECONDS: i64 = 45;

impl Presence {
    /// Whether it said it lives within [`PRESENCE_STALE_SECONDS`] of `now`.
    pub fn is_alive(&self, now: i64) -> bool {
        now - self.seen_at <= PRESENCE_STALE_SECONDS
    }
}

/// The shared record's key of a builder's presence (`_` never starts a repo name).
pub fn presence_key(builder: &str) -> String {
    format!("{PRESENCE_PREFIX}{builder}")
}

const PRESENCE_PREFIX: &str = "_builder/";

/// Where the record is kept.
enum Storage {
    /// Nowhere: no builder runs here.
    None,
    /// One JSON file, written whole on every change.
    File(PathBuf),
    /// A key-value bucket: each change goes to a writer task, which applies it to the bucket's
    /// newest value of the host's key and writes it back only if no other write came between
    /// (compare-and-set on the key's revision; a lost race reads and applies again).
    Bucket(tokio::sync::mpsc::UnboundedSender<(String, String, Change)>),
}

/// A change of one host's record, as the writer applies it (again, after a lost race).
#[derive(Clone)]
enum Change {
    Update(Arc<dyn Fn(&mut HostRecord) + Send + Sync>),
    Delete,
}

/// The record, shared by `Arc`.
pub struct Fleet {
    hosts: RwLock<Hosts>,
    storage: RwLock<Storage>,
    /// Counts changes, so that readers can tell whether what they rendered is still true.
    version: std::sync::atomic::AtomicU64,
    activity: RwLock<Activity>,
    /// The newest revision of the shared record its watch delivered.
    watch_seen: std::sync::atomic::AtomicU64,
    /// Times the watch was found stalled and started again.
    watch_restarts: std::sync::atomic::AtomicU64,
    /// Changes sent to the shared record's writer, and (its channel) how many it has written.
    sent: std::sync::atomic::AtomicU64,
    written: tokio::sync::watch::Sender<u64>,
    /// Every builder of the shared record, by name.
    builders: RwLock<BTreeMap<String, Presence>>,
}

impl Fleet {
    /// The record saved at `file` (if given and readable), or an empty one.
    pub fn load(file: Option<PathBuf>) -> Self {
        let hosts = file.as_deref().map(file::read).unwrap_or_default();
        Self {
            hosts: RwLock::new(hosts),
            storage: RwLock::new(file.map_or(Storage::None, Storage::File)),
            version: std::sync::atomic::AtomicU64::new(0),
            activity: RwLock::new(Activity::default()),
            watch_seen: std::sync::atomic::AtomicU64::new(0),
            watch_restarts: std::sync::atomic::AtomicU64::new(0),
            sent: std::sync::atomic::AtomicU64::new(0),
            written: tokio::sync::watch::channel(0).0,
            builders: RwLock::new(BTreeMap::new()),
        }
    }

    /// Changes one host's record (creating it) and saves the record. `change` is a function
    /// of the record, not a value: where the record is shared, it is applied again to the
    /// newest value whenever another builder wrote the host in between, so no write is lost.
    pub fn update(&self, repo: &str, host: &str, change: impl Fn(&mut HostRecord) + Send + Sync + 'static) {
        let mut hosts = self.hosts.write().unwrap_or_else(|e| e.into_inner());
        let record = hosts.entry((repo.to_owned(), host.to_owned())).or_default();
        change(record);
        self.version.fetch_add(1, std::sync::atomic::Ordering::Release);
        self.save(&hosts, &[(repo, host, Change::Update(Arc::new(change)))]);
    }

    /// Drops the hosts of `repo` for which `keep` is false (hosts the flake no longer defines).
    pub fn retain(&self, repo: &str, keep: impl Fn(&str) -> bool) {
        let mut hosts = self.hosts.write().unwrap_or_else(|e| e.into_inner());
        let gone: Vec<(String, String)> = hosts.keys().filter(|(r, h)| r == repo && !keep(h)).cloned().collect();
        if gone.is_empty() {
            return;
        }
        for key in &gone {
            hosts.remove(key);
        }
        self.version.fetch_add(1, std::sync::atomic::Ordering::Release);
        let changed: Vec<(&str, &str, Change)> =
            gone.iter().map(|(r, h)| (r.as_str(), h.as_str(), Change::Delete)).collect();
        self.save(&hosts, &changed);
    }

    /// Keeps the record after a change (under the hosts' lock, so saves stay in order): the
    /// file written whole, or the changed hosts sent to the bucket.
    fn save(&self, hosts: &Hosts, changed: &[(&str, &str, Change)]) {
        match &*self.storage.read().unwrap_or_else(|e| e.into_inner()) {
            Storage::None => {}
            Storage::File(file) => {
                if let Err(e) =
                    file::to_json(hosts).map_err(std::io::Error::other).and_then(|j| file::write_atomically(file, &j))
                {
                    tracing::warn!(file = %file.display(), err = %e, "cannot save the fleet record");
                }
            }
            Storage::Bucket(tx) => {
                for (repo, host, change) in changed {
                    self.sent.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
                    let _ = tx.send(((*repo).to_owned(), (*host).to_owned(), change.clone()));
                }
            }
        }
    }

    /// How many changes have been sent to where the record is kept so far (for
    /// [`Fleet::flushed_to`]).
    pub fn changes_sent(&self) -> u64 {
        self.sent.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Returns once the first `target` changes are where the record is kept (at once for a
    /// file; for the shared record, once its writer has written them, or given up on one).
    pub async fn flushed_to(&self, target: u64) {
        let mut written = self.written.subscribe();
        let _ = written.wait_for(|n| *n >= target).await;
    }

    /// Times the shared record's watch was found stalled and started again.
    pub fn watch_restarts(&self) -> u64 {
        self.watch_restarts.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Every builder the shared record names, by name (none without a shared record).
    pub fn builders(&self) -> BTreeMap<String, Presence> {
        self.builders.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// A change that another builder made (or this one, echoed): shown, not saved again.
    fn apply(&self, repo: &str, host: &str, record: Option<HostRecord>) {
        let mut hosts = self.hosts.write().unwrap_or_else(|e| e.into_inner());
        let key = (repo.to_owned(), host.to_owned());
        let changed = match record {
            Some(r) => hosts.insert(key, r.clone()).is_none_or(|old| old != r),
            None => hosts.remove(&key).is_some(),
        };
        if changed {
            self.version.fetch_add(1, std::sync::atomic::Ordering::Release);
        }
    }

    /// A copy of one host's record (without copying the others').
    pub fn host(&self, repo: &str, host: &str) -> Option<HostRecord> {
        self.hosts.read().unwrap_or_else(|e| e.into_inner()).get(&(repo.to_owned(), host.to_owned())).cloned()
    }

    /// A copy of the record.
    pub fn snapshot(&self) -> Hosts {
        self.hosts.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Whether the record is shared by several builders (a key-value bucket).
    pub fn is_shared(&self) -> bool {
        matches!(*self.storage.read().unwrap_or_else(|e| e.into_inner()), Storage::Bucket(_))
    }

    /// Whether a builder keeps this record (it is kept only where one runs).
    pub fn has_builder(&self) -> bool {
        !matches!(*self.storage.read().unwrap_or_else(|e| e.into_inner()), Storage::None)
    }

    /// What the builder is doing now.
    pub fn activity(&self) -> Activity {
        self.activity.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Says what the builder is doing now (a change like any other for readers).
    pub fn set_activity(&self, activity: Activity) {
        let mut now = self.activity.write().unwrap_or_else(|e| e.into_inner());
        if *now != activity {
            *now = activity;
            self.version.fetch_add(1, std::sync::atomic::Ordering::Release);
        }
    }

    /// Changes so far: a copy taken at the same version is still the record.
    pub fn version(&self) -> u64 {
        self.version.load(std::sync::atomic::Ordering::Acquire)
    }
}

/// Every key of `keys` and of `builders`, once each, in that order: what a client of the
/// fleet trusts.
pub fn fleet_keys<'a>(
    keys: impl IntoIterator<Item = String>,
    builders: impl IntoIterator<Item = &'a Presence>,
) -> Vec<String> {
    let mut all: Vec<String> = Vec::new();
    for key in keys.into_iter().chain(builders.into_iter().flat_map(|b| b.public_keys.iter().cloned())) {
        if !all.contains(&key) {
            all.push(key);
        }
    }
    all
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn survives_a_restart_and_a_corrupt_file_starts_empty() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("state/fleet.json");
        let f = Fleet::load(Some(file.clone()));
        f.update("fleet", "web1", |r| {
            r.last_build = Some(LastBuild::new(BuildResult::Success, 5, None));
            r.closure_bytes = Some(42);
        });
        let again = Fleet::load(Some(file.clone()));
        assert_eq!(again.snapshot(), f.snapshot());
        std::fs::write(&file, "{ not json").unwrap();
        assert!(Fleet::load(Some(file)).snapshot().is_empty());
    }

    #[test]
    fn a_failure_keeps_its_tail_and_the_derivation_that_failed() {
        let error = (0..50).map(|i| format!("line {i}")).collect::<Vec<_>>().join("\n")
            + "\nerror: builder for '/nix/store/4924di507lk0s315v70am3a9rf7nb5mq-bad.drv' failed with exit code 1";
        let b = LastBuild::failed(1, None, &error);
        let kept = b.error.unwrap();
        assert_eq!(kept.lines().count(), ERROR_LINES);
        assert!(kept.starts_with("line 31") && kept.contains("exit code 1"), "{kept}");
        assert_eq!(b.failed_drv.as_deref(), Some("/nix/store/4924di507lk0s315v70am3a9rf7nb5mq-bad.drv"));
        let newer =
            LastBuild::failed(1, None, "error: Cannot build '/nix/store/4924di507lk0s315v70am3a9rf7nb5mq-bad.drv'.\n");
        assert_eq!(newer.failed_drv.as_deref(), Some("/nix/store/4924di507lk0s315v70am3a9rf7nb5mq-bad.drv"));
        assert_eq!(LastBuild::failed(1, None, "no drv here").failed_drv, None);
    }

    #[test]
    fn a_version_1_record_reads_and_is_saved_as_version_2() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("fleet.json");
        let v1 = r#"{"version":1,"hosts":[{"repo":"fleet","host":"web1","last_build":{"status":"success","at":5,"commit":null},"generations":[],"closure_bytes":42,"closure_paths":3,"changes":null}]}"#;
        std::fs::write(&file, v1).unwrap();
        let f = Fleet::load(Some(file.clone()));
        let hosts = f.snapshot();
        let web1 = &hosts[&("fleet".to_owned(), "web1".to_owned())];
        assert_eq!((web1.closure_bytes, web1.branches.len()), (Some(42), 0));
        f.update("fleet", "web1", |r| {
            let build = LastBuild::new(BuildResult::Failure, 6, None);
            r.branches.insert("exp".into(), BranchBuild { build, out_path: None });
        });
        let saved: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
        assert_eq!(saved["version"], 2);
        assert_eq!(Fleet::load(Some(file)).snapshot(), f.snapshot());
    }

    #[test]
    fn todays_shared_record_entry_reads_with_its_enums_and_bucket_copy() {
        let entry = r#"{"last_build":{"status":"failure","at":7,"commit":"abc","error":"boom"},"generations":[],"bucket":{"present":3,"total":5,"queued":1,"failed":1,"at":9}}"#;
        let r: HostRecord = serde_json::from_str(entry).unwrap();
        assert_eq!(r.last_build.as_ref().map(|b| b.status), Some(BuildResult::Failure));
        let copy = r.bucket.unwrap();
        assert_eq!((copy.pushed.present, copy.pushed.total, copy.pushed.queued, copy.pushed.failed), (3, 5, 1, 1));
        assert_eq!((copy.pushed.uploaded, copy.at), (0, 9));
        // Written back, it keeps the wire's spelling.
        let back = serde_json::to_value(&r).unwrap();
        assert_eq!(back["last_build"]["status"], "failure");
        assert_eq!(back["bucket"]["present"], 3);
        assert!(
            serde_json::from_str::<HostRecord>(r#"{"last_build":{"status":"maybe","at":1,"commit":null}}"#).is_err()
        );
    }

    fn system(path: &str, commit: &str, before: Option<&str>, changes: Option<Changes>) -> NewSystem {
        NewSystem {
            path: path.into(),
            built_at: 1,
            commit: Some(commit.into()),
            builder: Some("b".into()),
            before: before.map(str::to_owned),
            changes,
        }
    }

    fn order(newer: &[&str], older: &[&str], fetched_at: i64) -> BranchOrder {
        let set = |c: &[&str]| c.iter().map(|c| (*c).to_owned()).collect();
        BranchOrder { newer: set(newer), older: set(older), fetched_at }
    }

    /// The host's state is from commit `d`, recorded at `at`.
    fn state_from(d: &str, at: i64) -> HostRecord {
        let mut h = HostRecord::default();
        let mut sys = system(&format!("/nix/store/{d}"), d, None, None);
        sys.built_at = at;
        h.place(&LastBuild::new(BuildResult::Success, at, Some(d.into())), Some(&sys), None, 3);
        h
    }

    #[test]
    fn a_commit_the_fetch_did_not_see_is_ordered_by_when_it_was_recorded() {
        let fetched_at = 10_000;
        let c = |commit: &str| LastBuild::new(BuildResult::Success, fetched_at + 5, Some(commit.into()));
        let sys_c = system("/nix/store/c", "c", None, None);
        let place = |state: &mut HostRecord, order: &BranchOrder| state.place(&c("c"), Some(&sys_c), Some(order), 3);
        // Pushed after this builder fetched, and recorded by another builder before this one
        // wrote: newer, whatever the two clocks say within the skew.
        for at in [fetched_at + 1, fetched_at - CLOCK_SKEW_SECONDS + 1] {
            let mut h = state_from("d", at);
            assert_eq!(place(&mut h, &order(&[], &["a"], fetched_at)), Placed::Superseded, "recorded at {at}");
            assert_eq!(h.generations.last().and_then(|g| g.commit.as_deref()), Some("d"));
        }
        // Recorded well before the fetch, yet not on the branch it fetched: dropped from it.
        let mut h = state_from("x", fetched_at - CLOCK_SKEW_SECONDS - 1);
        assert_eq!(place(&mut h, &order(&[], &["a"], fetched_at)), Placed::Current);
        assert_eq!(h.generations.last().and_then(|g| g.commit.as_deref()), Some("c"));
        // Known to the fetch: its place in the history decides, whenever it was recorded.
        let mut h = state_from("a", fetched_at + 1);
        assert_eq!(place(&mut h, &order(&[], &["a"], fetched_at)), Placed::Current);
        let mut h = state_from("d", 1);
        assert_eq!(place(&mut h, &order(&["d"], &["a"], fetched_at)), Placed::Superseded);
        // The same commit again, and a flake without history: never ordered away.
        let mut h = state_from("c", fetched_at + 1);
        assert_eq!(place(&mut h, &order(&[], &[], fetched_at)), Placed::Current);
        let mut h = state_from("d", fetched_at + 1);
        assert_eq!(h.place(&c("c"), Some(&sys_c), None, 3), Placed::Current);
    }

    #[test]
    fn a_host_has_one_history_numbered_once_and_ordered_by_the_branch() {
        let ok = |c: &str| LastBuild::new(BuildResult::Success, 1, Some(c.into()));
        let mut h = HostRecord::default();
        let first = crate::nix::closure_diff::diff(&[], &[]);
        assert_eq!(h.place(&ok("a"), Some(&system("/nix/store/a", "a", None, Some(first))), None, 3), Placed::Current);
        let mut d = crate::nix::closure_diff::diff(&[], &[]);
        d.paths_before = 7;
        let sys_d = system("/nix/store/d", "d", Some("/nix/store/a"), Some(d.clone()));
        assert_eq!(h.place(&ok("d"), Some(&sys_d), None, 3), Placed::Current);
        // The same system again, from another builder: no second generation.
        assert_eq!(h.place(&ok("d"), Some(&sys_d), None, 3), Placed::Current);
        let numbers: Vec<u64> = h.generations.iter().map(|g| g.number).collect();
        assert_eq!(numbers, [1, 2]);
        assert_eq!(h.changes.as_ref().map(|c| c.paths_before), Some(7));
        // An older commit (d descends from c) ending later is kept apart, success or failure.
        let order = order(&["d"], &["c", "a"], 1);
        let sys_c = system("/nix/store/c", "c", Some("/nix/store/a"), None);
        assert_eq!(h.place(&ok("c"), Some(&sys_c), Some(&order), 3), Placed::Superseded);
        assert_eq!(h.place(&LastBuild::failed(2, Some("c".into()), "boom"), None, Some(&order), 3), Placed::Superseded);
        assert_eq!(h.generations.last().map(|g| g.path.as_str()), Some("/nix/store/d"));
        assert_eq!(h.last_build.as_ref().and_then(|b| b.commit.as_deref()), Some("d"));
        assert_eq!(h.changes.as_ref().map(|c| c.paths_before), Some(7));
        // Changes worked out against another system than the one it follows are not kept.
        let e = system("/nix/store/e", "e", Some("/nix/store/a"), Some(d));
        assert_eq!(h.place(&ok("e"), Some(&e), None, 2), Placed::Current);
        assert_eq!(h.changes, None);
        let kept: Vec<(u64, &str)> = h.generations.iter().map(|g| (g.number, g.path.as_str())).collect();
        assert_eq!(kept, [(2, "/nix/store/d"), (3, "/nix/store/e")]);
        // Back to an earlier system: it moves up, numbered anew, in one slot.
        let back = system("/nix/store/d", "f", Some("/nix/store/e"), None);
        assert_eq!(h.place(&ok("f"), Some(&back), None, 3), Placed::Current);
        let kept: Vec<(u64, &str)> = h.generations.iter().map(|g| (g.number, g.path.as_str())).collect();
        assert_eq!(kept, [(3, "/nix/store/e"), (4, "/nix/store/d")]);
    }
}
