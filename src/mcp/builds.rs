//! The builds an assistant started through `hearth mcp`, by id: their state, the last progress
//! lines and the final reply, so that `build_status` can answer after `build` returned at once.
//!
//! Bounded: at most [`MAX_ENTRIES`] builds are remembered, finished ones for [`KEEP_FINISHED`];
//! the oldest finished ones go first, and a build still running is never forgotten.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::builder::job::{Reply, Status};

/// Builds remembered at most.
pub(super) const MAX_ENTRIES: usize = 100;
/// How long a finished build's result is kept.
pub(super) const KEEP_FINISHED: Duration = Duration::from_secs(24 * 3600);
/// Progress lines kept per build.
const RECENT: usize = 20;

struct Entry {
    repo: String,
    target: String,
    started: Instant,
    finished: Option<Instant>,
    recent: VecDeque<String>,
    commit: Option<String>,
    result: Option<Value>,
    /// `running`, `completed`, `failed`, `rejected` or `error` (no final reply).
    state: &'static str,
}

#[derive(Default)]
pub(super) struct Builds {
    entries: Mutex<BTreeMap<String, Entry>>,
}

impl Builds {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Entry>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a new running build; `None` when as many builds as remembered are running.
    pub(super) fn start(&self, id: &str, repo: &str, target: &str) -> Option<()> {
        let mut entries = self.lock();
        let now = Instant::now();
        entries.retain(|_, e| e.finished.is_none_or(|f| now.duration_since(f) < KEEP_FINISHED));
        while entries.len() >= MAX_ENTRIES {
            let oldest = entries.iter().filter_map(|(k, e)| Some((e.finished?, k.clone()))).min();
            let (_, key) = oldest?;
            entries.remove(&key);
        }
        entries.insert(
            id.to_owned(),
            Entry {
                repo: repo.to_owned(),
                target: target.to_owned(),
                started: now,
                finished: None,
                recent: VecDeque::new(),
                commit: None,
                result: None,
                state: "running",
            },
        );
        Some(())
    }

    /// Notes a reply of build `id`.
    pub(super) fn update(&self, id: &str, reply: &Reply, line: String) {
        let mut entries = self.lock();
        let Some(e) = entries.get_mut(id) else { return };
        if e.recent.len() == RECENT {
            e.recent.pop_front();
        }
        e.recent.push_back(line);
        if reply.commit.is_some() {
            e.commit.clone_from(&reply.commit);
        }
        if reply.status.is_final() {
            e.state = match reply.status {
                Status::Completed => "completed",
                Status::Rejected => "rejected",
                Status::Interrupted => "interrupted",
                _ => "failed",
            };
            e.result = serde_json::to_value(reply).ok();
            e.finished = Some(Instant::now());
        }
    }

    /// Build `id` ended without a final reply (timeout, NATS unreachable).
    pub(super) fn fail(&self, id: &str, why: String) {
        let mut entries = self.lock();
        if let Some(e) = entries.get_mut(id) {
            e.state = "error";
            e.result = Some(json!({ "error": why }));
            e.finished = Some(Instant::now());
        }
    }

    /// What is known of build `id`, for `build_status`.
    pub(super) fn status(&self, id: &str) -> Option<Value> {
        let entries = self.lock();
        let e = entries.get(id)?;
        let end = e.finished.unwrap_or_else(Instant::now);
        Some(json!({
            "build_id": id,
            "repo": e.repo,
            "target": e.target,
            "state": e.state,
            "commit": e.commit,
            "elapsed_seconds": end.duration_since(e.started).as_secs(),
            "recent_progress": e.recent,
            "result": e.result,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembers_bounded_and_never_drops_a_running_build() {
        let b = Builds::default();
        for i in 0..MAX_ENTRIES {
            b.start(&i.to_string(), "r", "all").unwrap();
        }
        // All running: no room, and nothing running is forgotten.
        assert!(b.start("x", "r", "all").is_none());
        let done = Reply::new(Status::Completed, "r", "all");
        b.update("0", &done, "completed".into());
        assert_eq!(b.status("0").unwrap()["state"], "completed");
        b.start("x", "r", "all").unwrap();
        assert!(b.status("0").is_none(), "the finished build makes room");
        assert_eq!(b.status("1").unwrap()["state"], "running");
    }
}
