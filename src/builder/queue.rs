//! The bounded build queue: one running job, waiting jobs in order, and joining of identical
//! requests so nothing is built twice.
//!
//! Identical means the same repo, target, branch and requested `rev`. A request that names a
//! `rev` also joins a running build that resolved to exactly that commit; a request that names
//! none joins a running build of its branch. Each build takes at most [`MAX_SUBSCRIBERS`]
//! requests, so its fan-out of replies stays bounded.

use std::collections::VecDeque;
use std::sync::Mutex;

use tokio::sync::Notify;

use super::config::RepoConfig;
use super::transport::Ack;

/// A build to run and the subjects its replies go to.
#[derive(Debug, Clone)]
pub(super) struct Job {
    pub repo: RepoConfig,
    pub target: String,
    pub branch: String,
    /// The commit asked for, if any.
    pub rev: Option<String>,
    /// Build only if the commit was not built within this many seconds.
    pub once_per: Option<u64>,
    pub reply_to: Vec<String>,
    /// The durable requests it answers (JetStream), acknowledged after its final reply.
    pub acks: Vec<Ack>,
}

/// Requests one build answers at most (its own and those that joined it).
pub(super) const MAX_SUBSCRIBERS: usize = 64;

impl Job {
    fn same_build(&self, other: &Job) -> bool {
        self.repo.name == other.repo.name
            && self.target == other.target
            && self.branch == other.branch
            && self.rev == other.rev
    }

    /// Whether `other` may join this job while it runs, having resolved to `commit`.
    fn joinable_running(&self, other: &Job, commit: Option<&str>) -> bool {
        let same_place =
            self.repo.name == other.repo.name && self.target == other.target && self.branch == other.branch;
        same_place
            && match other.rev.as_deref() {
                None => self.rev.is_none(),
                Some(rev) => self.rev.as_deref() == Some(rev) || commit == Some(rev),
            }
    }
}

/// What happened to a pushed job.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Enqueued {
    /// An identical job is running or waiting; the request's replies join it.
    Joined,
    /// Nothing else runs or waits: it starts now.
    Starting,
    /// Waiting at this place (1 = next to run).
    Queued { position: usize },
    /// The queue is full.
    Full,
    /// The identical build has as many requests as it takes.
    TooManyJoiners,
}

#[derive(Default)]
struct State {
    waiting: VecDeque<Job>,
    running: Option<Job>,
    /// The commit the running job resolved to, once known.
    running_commit: Option<String>,
}

/// Adds `job`'s reply subjects to `target` unless that makes too many.
fn join(target: &mut Job, job: Job) -> Enqueued {
    if target.reply_to.len() + job.reply_to.len() > MAX_SUBSCRIBERS {
        return Enqueued::TooManyJoiners;
    }
    target.reply_to.extend(job.reply_to);
    target.acks.extend(job.acks);
    Enqueued::Joined
}

/// A job by name: repo, target and branch.
pub(super) struct Named {
    pub(super) repo: String,
    pub(super) target: String,
    pub(super) branch: String,
}

pub(super) struct Queue {
    state: Mutex<State>,
    capacity: usize,
    notify: Notify,
    /// Told when the running job finishes.
    finished: Notify,
}

impl Queue {
    pub(super) fn new(capacity: usize) -> Self {
        Self { state: Mutex::default(), capacity, notify: Notify::new(), finished: Notify::new() }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the queue half-updated (each update is
        // one push or pop), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn push(&self, job: Job) -> Enqueued {
        let mut s = self.lock();
        let State { running, running_commit, waiting } = &mut *s;
        if let Some(running) = running.as_mut().filter(|r| r.joinable_running(&job, running_commit.as_deref())) {
            return join(running, job);
        }
        if let Some(waiting) = waiting.iter_mut().find(|w| w.same_build(&job)) {
            return join(waiting, job);
        }
        if s.waiting.len() >= self.capacity {
            return Enqueued::Full;
        }
        s.waiting.push_back(job);
        let position = s.waiting.len();
        let idle = s.running.is_none() && position == 1;
        drop(s);
        self.notify.notify_one();
        if idle { Enqueued::Starting } else { Enqueued::Queued { position } }
    }

    /// Waits for the next job and marks it running.
    pub(super) async fn next(&self) -> Job {
        loop {
            let notified = self.notify.notified();
            {
                let mut s = self.lock();
                if let Some(job) = s.waiting.pop_front() {
                    s.running = Some(job.clone());
                    s.running_commit = None;
                    return job;
                }
            }
            notified.await;
        }
    }

    /// The running job resolved its branch to `commit`.
    pub(super) fn set_running_commit(&self, commit: Option<String>) {
        self.lock().running_commit = commit;
    }

    /// The running job is done.
    pub(super) fn finish(&self) {
        let mut s = self.lock();
        s.running = None;
        s.running_commit = None;
        drop(s);
        self.finished.notify_waiters();
    }

    /// Waits until nothing runs or waits.
    pub(super) async fn idle(&self) {
        loop {
            let finished = self.finished.notified();
            tokio::pin!(finished);
            finished.as_mut().enable();
            {
                let s = self.lock();
                if s.running.is_none() && s.waiting.is_empty() {
                    return;
                }
            }
            finished.await;
        }
    }

    /// The running job's durable requests.
    pub(super) fn running_acks(&self) -> Vec<Ack> {
        self.lock().running.as_ref().map(|r| r.acks.clone()).unwrap_or_default()
    }

    /// Each waiting job's place (1 = next) and reply subjects.
    pub(super) fn waiting_subscribers(&self) -> Vec<(usize, Vec<String>)> {
        self.lock().waiting.iter().enumerate().map(|(i, j)| (i + 1, j.reply_to.clone())).collect()
    }

    /// Adds reply subjects to the running job (requests another builder took that joined it);
    /// returns those that were not there yet.
    pub(super) fn add_running_subscribers(&self, subjects: Vec<String>) -> Vec<String> {
        let mut s = self.lock();
        let Some(running) = s.running.as_mut() else { return Vec::new() };
        let new: Vec<String> = subjects.into_iter().filter(|t| !running.reply_to.contains(t)).collect();
        running.reply_to.extend(new.iter().cloned());
        new
    }

    /// The running job's commit, once resolved.
    pub(super) fn running_commit(&self) -> Option<String> {
        self.lock().running_commit.clone()
    }

    pub(super) fn running_subscribers(&self) -> Vec<String> {
        self.lock().running.as_ref().map(|r| r.reply_to.clone()).unwrap_or_default()
    }

    pub(super) fn waiting(&self) -> usize {
        self.lock().waiting.len()
    }

    /// The running job and the waiting ones, for the fleet page.
    pub(super) fn snapshot(&self) -> (Option<Named>, Vec<Named>) {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let name = |j: &Job| Named { repo: j.repo.name.clone(), target: j.target.clone(), branch: j.branch.clone() };
        (state.running.as_ref().map(name), state.waiting.iter().map(name).collect())
    }

    /// Takes every waiting job (at shutdown).
    pub(super) fn drain(&self) -> Vec<Job> {
        self.lock().waiting.drain(..).collect()
    }
}

impl std::fmt::Display for Enqueued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Enqueued::Joined => f.write_str("joined"),
            Enqueued::Starting => f.write_str("starting"),
            Enqueued::Queued { position } => write!(f, "queued at {position}"),
            Enqueued::Full => f.write_str("queue full"),
            Enqueued::TooManyJoiners => f.write_str("too many joiners"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(target: &str, reply: &str) -> Job {
        Job {
            repo: RepoConfig { name: "r".into(), url: "git+file:///r".into(), branch: "master".into() },
            target: target.into(),
            branch: "master".into(),
            rev: None,
            once_per: None,
            reply_to: vec![reply.into()],
            acks: Vec::new(),
        }
    }

    fn at(rev: &str, reply: &str) -> Job {
        Job { rev: Some(rev.repeat(40)), ..job("a", reply) }
    }

    #[tokio::test]
    async fn a_rev_joins_only_a_build_of_that_commit() {
        let q = Queue::new(4);
        assert_eq!(q.push(job("a", "1")), Enqueued::Starting);
        let _running = q.next().await;
        // Unresolved yet: a request for a commit cannot know it is the same build.
        assert_eq!(q.push(at("b", "2")), Enqueued::Queued { position: 1 });
        q.set_running_commit(Some("c".repeat(40)));
        // Resolved to c: a request for b waits (joins the waiting b), one for c joins.
        assert_eq!(q.push(at("b", "3")), Enqueued::Joined);
        assert_eq!(q.push(at("c", "4")), Enqueued::Joined);
        assert_eq!(q.running_subscribers(), vec!["1".to_owned(), "4".to_owned()]);
        assert_eq!(q.drain()[0].reply_to, vec!["2".to_owned(), "3".to_owned()]);
    }

    #[tokio::test]
    async fn joiners_are_bounded() {
        let q = Queue::new(4);
        assert_eq!(q.push(job("a", "0")), Enqueued::Starting);
        for i in 1..MAX_SUBSCRIBERS {
            assert_eq!(q.push(job("a", &i.to_string())), Enqueued::Joined);
        }
        assert_eq!(q.push(job("a", "x")), Enqueued::TooManyJoiners);
        assert_eq!(q.push(job("b", "y")), Enqueued::Queued { position: 2 });
    }

    #[tokio::test]
    async fn joins_and_bounds() {
        let q = Queue::new(2);
        assert_eq!(q.push(job("a", "1")), Enqueued::Starting);
        assert_eq!(q.push(job("a", "2")), Enqueued::Joined);
        assert_eq!(q.push(job("b", "3")), Enqueued::Queued { position: 2 });
        assert_eq!(q.push(job("c", "4")), Enqueued::Full);
        let running = q.next().await;
        assert_eq!(running.reply_to, vec!["1".to_owned(), "2".to_owned()]);
        assert_eq!(q.push(job("a", "5")), Enqueued::Joined);
        assert_eq!(q.running_subscribers(), vec!["1".to_owned(), "2".to_owned(), "5".to_owned()]);
        q.finish();
        assert_eq!(q.push(job("a", "6")), Enqueued::Queued { position: 2 });
        let _ = q.drain();
        assert_eq!(q.push(job("x", "7")), Enqueued::Starting);
        assert_eq!(q.drain().len(), 1);
    }
}
