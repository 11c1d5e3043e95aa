//! The bounded build queue: one running job, waiting jobs in order, and joining of identical
//! requests (same repo, target and branch) so nothing is built twice.

use std::collections::VecDeque;
use std::sync::Mutex;

use tokio::sync::Notify;

use super::config::RepoConfig;

/// A build to run and the subjects its replies go to.
#[derive(Debug, Clone)]
pub(super) struct Job {
    pub repo: RepoConfig,
    pub target: String,
    pub branch: String,
    pub reply_to: Vec<String>,
}

impl Job {
    fn same_build(&self, other: &Job) -> bool {
        self.repo.name == other.repo.name && self.target == other.target && self.branch == other.branch
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
}

#[derive(Default)]
struct State {
    waiting: VecDeque<Job>,
    running: Option<Job>,
}

pub(super) struct Queue {
    state: Mutex<State>,
    capacity: usize,
    notify: Notify,
}

impl Queue {
    pub(super) fn new(capacity: usize) -> Self {
        Self { state: Mutex::default(), capacity, notify: Notify::new() }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the queue half-updated (each update is
        // one push or pop), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn push(&self, job: Job) -> Enqueued {
        let mut s = self.lock();
        if let Some(running) = s.running.as_mut().filter(|r| r.same_build(&job)) {
            running.reply_to.extend(job.reply_to);
            return Enqueued::Joined;
        }
        if let Some(waiting) = s.waiting.iter_mut().find(|w| w.same_build(&job)) {
            waiting.reply_to.extend(job.reply_to);
            return Enqueued::Joined;
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
                    return job;
                }
            }
            notified.await;
        }
    }

    /// The running job is done.
    pub(super) fn finish(&self) {
        self.lock().running = None;
    }

    pub(super) fn running_subscribers(&self) -> Vec<String> {
        self.lock().running.as_ref().map(|r| r.reply_to.clone()).unwrap_or_default()
    }

    pub(super) fn waiting(&self) -> usize {
        self.lock().waiting.len()
    }

    /// Takes every waiting job (at shutdown).
    pub(super) fn drain(&self) -> Vec<Job> {
        self.lock().waiting.drain(..).collect()
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
            reply_to: vec![reply.into()],
        }
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
