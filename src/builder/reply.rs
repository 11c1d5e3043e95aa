//! The reply room: who hears a running build (its own request and those that joined it), how
//! often progress goes out (one [`Throttle`]), and what a build's final reply says
//! ([`final_reply`], pure).
//!
//! Architecture invariant: every reply a builder sends goes through [`Reporter`]; replies
//! carry what a client needs as fields (`kind`, `log`, `progress`), never only as text.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::job::{self, HostStatus, HostSummary, Kind, Reply, Status};
use super::queue::Queue;

/// How long a final reply is retried while NATS is unreachable, after shutdown began.
const FINAL_REPLY_GRACE: Duration = Duration::from_secs(10);

/// What every reply of one request carries: the request and, once resolved, its commit.
#[derive(Debug, Clone)]
pub struct Heading {
    pub repo: String,
    pub target: String,
    pub branch: Option<String>,
    pub commit: Option<String>,
}

impl Heading {
    /// A reply of this request.
    pub fn reply(&self, status: Status) -> Reply {
        let mut r = Reply::new(status, &self.repo, &self.target);
        r.branch = self.branch.clone();
        r.commit = self.commit.clone();
        r
    }

    /// A progress reply of this kind.
    pub fn progress(&self, kind: Kind) -> Reply {
        let mut r = self.reply(Status::Progress);
        r.kind = Some(kind);
        r
    }
}

/// At most one update every `every`: progress goes out when something changed and the last
/// went out long enough ago.
#[derive(Debug)]
pub struct Throttle {
    every: Duration,
    last: Option<Instant>,
}

impl Throttle {
    pub fn new(every: Duration) -> Self {
        Self { every, last: None }
    }

    /// Whether an update may go out now; if so, the clock restarts.
    pub fn due(&mut self) -> bool {
        if self.last.is_some_and(|t| t.elapsed() < self.every) {
            return false;
        }
        self.last = Some(Instant::now());
        true
    }

    /// How long until an update may go out.
    pub fn wait(&self) -> Duration {
        self.last.map_or(Duration::ZERO, |t| self.every.saturating_sub(t.elapsed()))
    }
}

/// Sends replies: the running build's to its subscribers, and the heartbeat's clock.
pub struct Reporter {
    client: async_nats::Client,
    queue: Arc<Queue>,
    /// This builder's name, on every reply it sends.
    builder: String,
    /// When a reply of the running build last went out.
    last_reply: Mutex<Instant>,
}

impl Reporter {
    pub(super) fn new(client: async_nats::Client, queue: Arc<Queue>, builder: String) -> Self {
        Self { client, queue, builder, last_reply: Mutex::new(Instant::now()) }
    }

    /// Subjects to reply to for the running job: its own and those of requests that joined it.
    pub fn subscribers(&self) -> Vec<String> {
        self.queue.running_subscribers()
    }

    /// How long the running build has said nothing.
    pub fn silent_for(&self) -> Duration {
        self.last_reply.lock().map(|t| t.elapsed()).unwrap_or_default()
    }

    /// Sends `reply` to everyone following the running build.
    pub async fn running(&self, reply: &Reply) {
        self.publish(&self.subscribers(), reply).await;
    }

    /// Publishes `reply` to `to`; restarts the heartbeat's clock.
    pub async fn publish(&self, to: &[String], reply: &Reply) {
        if let Ok(mut t) = self.last_reply.lock() {
            *t = Instant::now();
        }
        self.send(to, reply).await;
    }

    /// Publishes `reply` to `to`, cut to fit the server's largest message.
    pub async fn send(&self, to: &[String], reply: &Reply) {
        // Replies over the server's max payload would be refused: cut log tails to fit.
        let max = self.client.server_info().max_payload;
        let max = if max == 0 { 1 << 20 } else { max };
        let mut reply = reply.clone();
        reply.builder.get_or_insert_with(|| self.builder.clone());
        let payload = bytes::Bytes::from(job::encode_within(&reply, max.saturating_sub(512)));
        for subject in to {
            if let Err(e) = self.client.publish(subject.clone(), payload.clone()).await {
                tracing::warn!(%subject, err = %e, "cannot publish reply");
            }
        }
    }

    /// Publishes a final reply and waits until NATS has it: while NATS is down the client holds
    /// the message and sends it on reconnect.
    pub async fn publish_final(&self, to: &[String], reply: &Reply, cancel: &CancellationToken) {
        self.publish(to, reply).await;
        let deadline = Instant::now() + FINAL_REPLY_GRACE;
        loop {
            match tokio::time::timeout(Duration::from_secs(5), self.client.flush()).await {
                Ok(Ok(())) => return,
                Ok(Err(e)) => tracing::warn!(err = %e, "final reply not flushed yet"),
                Err(_) => tracing::warn!("final reply waits for NATS"),
            }
            // Keep waiting while hearth runs; give up only after the shutdown grace.
            if cancel.is_cancelled() && Instant::now() > deadline {
                tracing::error!("final reply not delivered before shutdown");
                return;
            }
        }
    }
}

/// A build's final status and message from its hosts' results; `shutdown`: the builder's
/// shutdown cut it.
pub fn final_reply(summaries: &[HostSummary], shutdown: bool) -> (Status, String) {
    let ok = summaries.iter().all(|s| s.status.is_ok());
    let total = summaries.len();
    if ok {
        return (Status::Completed, format!("{total} host(s) built"));
    }
    if shutdown {
        let done = summaries.iter().filter(|s| s.status != HostStatus::Interrupted).count();
        return (
            Status::Interrupted,
            format!("interrupted by shutdown after {done} of {total} host(s); send it again"),
        );
    }
    let failed: Vec<&str> =
        summaries.iter().filter(|s| s.status == HostStatus::Failure).map(|s| s.host.as_str()).collect();
    (Status::Failed, format!("{} of {total} host(s) failed: {}", failed.len(), failed.join(", ")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(host: &str, status: HostStatus) -> HostSummary {
        HostSummary {
            host: host.into(),
            status,
            out_path: None,
            error: None,
            duration_seconds: 1.0,
            changes: None,
            uploaded: None,
        }
    }

    #[test]
    fn a_final_reply_says_what_its_hosts_did() {
        let ok = [summary("web1", HostStatus::Success), summary("db1", HostStatus::Unchanged)];
        assert_eq!(final_reply(&ok, false), (Status::Completed, "2 host(s) built".into()));
        // Every host good: completed even if shutdown came after.
        assert_eq!(final_reply(&ok, true).0, Status::Completed);
        let bad = [
            summary("web1", HostStatus::Failure),
            summary("web2", HostStatus::Success),
            summary("db1", HostStatus::Failure),
        ];
        assert_eq!(final_reply(&bad, false), (Status::Failed, "2 of 3 host(s) failed: web1, db1".into()));
        let cut = [summary("web1", HostStatus::Success), summary("db1", HostStatus::Interrupted)];
        assert_eq!(
            final_reply(&cut, true),
            (Status::Interrupted, "interrupted by shutdown after 1 of 2 host(s); send it again".into())
        );
        assert_eq!(final_reply(&[], false).0, Status::Completed);
    }

    #[test]
    fn a_throttle_lets_one_update_through_each_period() {
        let mut t = Throttle::new(Duration::from_secs(3600));
        assert_eq!(t.wait(), Duration::ZERO);
        assert!(t.due());
        assert!(!t.due());
        assert!(t.wait() > Duration::from_secs(3500));
        let mut always = Throttle::new(Duration::ZERO);
        assert!(always.due() && always.due());
    }
}
