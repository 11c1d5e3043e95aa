//! What a builder shares with the other builders of a JetStream fleet, beside the record: its
//! presence (who it is, its keys, what it runs, every few seconds) and the claims of the builds
//! it runs ([`super::claim`]), so that an identical request another builder takes joins the
//! build instead of running it again.

use std::time::{Duration, Instant};

use super::Worker;
use super::claim::Claimed;
use super::job::{Kind, Reply};
use super::queue::Job;
use super::record::now_seconds;
use crate::fleet::{Presence, presence_key};
use crate::metrics::Builder;

/// A give-back count as the shared record holds it (decimal text).
fn count_of(value: &[u8]) -> Option<i64> {
    std::str::from_utf8(value).ok()?.trim().parse().ok()
}

/// How long a builder not heard from stays in the record.
const FORGET_AFTER_SECONDS: i64 = 24 * 3600;

/// The shared record's key counting a request's give-backs, by its stream sequence.
fn given_back_key(seq: u64) -> String {
    format!("_given_back/{seq}")
}

/// How often a builder says it lives (and at once when what it runs changes).
const PRESENCE_EVERY: Duration = Duration::from_secs(10);

/// How a claimed request goes on.
pub(super) enum Claim {
    /// This builder builds it (holding the claim, if the record answered).
    Build,
    /// Another builder builds it; the request's replies are that builder's now.
    Joined,
}

impl Worker {
    /// This builder's presence as it stands.
    fn presence(&self) -> Presence {
        let activity = self.fleet.activity();
        Presence {
            name: self.config.name.clone(),
            public_keys: self.config.public_keys.clone(),
            seen_at: now_seconds(),
            commit: activity.running.as_ref().and(self.queue.running_commit()),
            running: activity.running,
            since: activity.since,
            queued: activity.queued.len(),
        }
    }

    /// Writes this builder's presence into the shared record when it changed or is due.
    pub(super) async fn announce(&self) {
        let Some(claims) = self.claims.get() else { return };
        let mut last = self.announced.lock().await;
        let now = self.presence();
        let same = |p: &Presence| Presence { seen_at: now.seen_at, ..p.clone() } == now;
        if last.as_ref().is_some_and(|(p, at)| same(p) && at.elapsed() < PRESENCE_EVERY) {
            return;
        }
        let value = bytes::Bytes::from(serde_json::to_vec(&now).unwrap_or_default());
        match claims.kv.put(presence_key(&self.config.name), value).await {
            Ok(_) => *last = Some((now, Instant::now())),
            Err(e) => tracing::debug!(err = %e, "cannot write this builder's presence"),
        }
    }

    /// Takes this builder's presence out of the shared record (a graceful stop: it is not gone
    /// by accident).
    pub(super) async fn withdraw(&self) {
        if let Some(claims) = self.claims.get()
            && let Err(e) = claims.kv.delete(presence_key(&self.config.name)).await
        {
            tracing::debug!(err = %e, "cannot take this builder's presence out of the record");
        }
    }

    /// Claims `job` at `commit` for this builder, or joins the identical build another live
    /// builder runs (telling the request's clients so, and acknowledging it).
    pub(super) async fn claim(&self, job: &Job, commit: Option<&str>) -> Claim {
        let (Some(claims), Some(commit)) = (self.claims.get(), commit) else { return Claim::Build };
        // Our presence says we build this request before our claim exists: a builder that
        // reads the claim and then our presence finds them agreeing.
        self.announce().await;
        // A claim is joined only while its builder lives and says it builds this very request
        // (its commit may not be in its presence yet): a claim left behind (its request given
        // up, say) is taken over, never joined.
        let building = |p: &Presence| {
            let same = p.running.as_ref().is_some_and(|r| {
                (r.repo.as_str(), r.target.as_str(), r.branch.as_str())
                    == (job.repo.name.as_str(), job.target.as_str(), job.branch.as_str())
            });
            p.is_alive(now_seconds()) && same && p.commit.as_deref().is_none_or(|c| c == commit)
        };
        let taking_over = job.acks.iter().any(|a| a.delivered > 1);
        let place = (job.repo.name.as_str(), job.target.as_str(), job.branch.as_str(), commit);
        // Everyone following the request here, those that joined it on this builder included.
        let reply_to = self.queue.running_subscribers();
        match claims.claim(place, &reply_to, taking_over, building).await {
            None => Claim::Build,
            Some(Claimed::Mine(held)) => {
                tracing::debug!(repo = %job.repo.name, target = %job.target, %commit, "claimed the build");
                let inherited = held.inherited.clone();
                *self.held.lock().await = Some(held);
                if !inherited.is_empty() {
                    let said = format!("builder {} took over the build (its builder stopped)", self.config.name);
                    self.tell_joiners(inherited, Kind::Requeued, said).await;
                }
                Claim::Build
            }
            Some(Claimed::Joined { builder }) => {
                tracing::info!(repo = %job.repo.name, target = %job.target, %commit, %builder, "joined the identical build another builder runs");
                let said = format!("joined the identical build builder {builder} runs; its replies follow");
                let r = Reply::progress(Kind::Joined, &job.repo.name, &job.target).message(said);
                self.reporter.publish(&reply_to, &r).await;
                for ack in self.queue.running_acks() {
                    ack.done().await;
                }
                Claim::Joined
            }
        }
    }

    /// Requests other builders took that joined the claim since it was last read: they
    /// follow the running build from now on.
    pub(super) async fn follow_joiners(&self) {
        let Some(claims) = self.claims.get() else { return };
        let mut held = self.held.lock().await;
        let Some(h) = held.as_mut() else { return };
        let new = claims.new_joiners(h).await;
        drop(held);
        if !new.is_empty() {
            let said = format!("joined the build builder {} runs", self.config.name);
            self.tell_joiners(new, Kind::Joined, said).await;
        }
    }

    /// Releases the running build's claim before its final reply; late joiners get it too.
    pub(super) async fn release_claim(&self) {
        let (Some(claims), Some(held)) = (self.claims.get(), self.held.lock().await.take()) else { return };
        let late = claims.release(held).await;
        self.queue.add_running_subscribers(late);
    }

    /// Each builder's last presence into the metrics; a builder that withdrew (a graceful
    /// stop) loses its series, so only one that stopped without a word is alerted on. One not
    /// heard from for [`FORGET_AFTER_SECONDS`] is taken out of the record (by any builder): a
    /// builder retired without a graceful stop is shown and alerted on for a day, not for ever.
    pub(super) async fn count_builders(&self) {
        let mut builders = self.fleet.builders();
        let departed: Vec<String> = builders
            .iter()
            .filter(|(_, p)| now_seconds() - p.seen_at > FORGET_AFTER_SECONDS)
            .map(|(name, _)| name.clone())
            .collect();
        if let Some(claims) = self.claims.get() {
            for name in departed {
                tracing::info!(builder = %name, "forgetting a builder not heard from for a day");
                if let Err(e) = claims.kv.delete(presence_key(&name)).await {
                    tracing::debug!(builder = %name, err = %e, "cannot forget a builder yet");
                }
                builders.remove(&name);
            }
        }
        let mut counted = self.counted_builders.lock().unwrap_or_else(|e| e.into_inner());
        for gone in counted.iter().filter(|b| !builders.contains_key(*b)) {
            self.metrics.fleet_builder_seen.remove(&Builder { builder: gone.clone() });
        }
        *counted = builders.keys().cloned().collect();
        for (name, p) in builders {
            self.metrics.fleet_builder_seen.get_or_create(&Builder { builder: name }).set(p.seen_at);
        }
    }

    /// How many deliveries of the request at stream sequence `seq` were given back on a
    /// graceful stop (they do not count against `max_deliver`); 0 without a shared record.
    pub(super) async fn given_back(&self, seq: u64) -> i64 {
        let Some(claims) = self.claims.get() else { return 0 };
        match claims.kv.get(given_back_key(seq)).await {
            Ok(Some(v)) => count_of(&v).unwrap_or(0),
            Ok(None) => 0,
            Err(e) => {
                tracing::warn!(seq, err = %e, "cannot read how often a request was given back; counting none");
                0
            }
        }
    }

    /// Counts a give-back of the request at `seq` (compare-and-set: builders stopping at once
    /// lose no count).
    pub(super) async fn note_given_back(&self, seq: u64) {
        let Some(claims) = self.claims.get() else { return };
        let key = given_back_key(seq);
        for _ in 0..10 {
            let entry = match claims.kv.entry(key.clone()).await {
                Ok(e) => e.filter(|e| e.operation == async_nats::jetstream::kv::Operation::Put),
                Err(e) => return tracing::warn!(seq, err = %e, "cannot count a give-back"),
            };
            let count = entry.as_ref().and_then(|e| count_of(&e.value));
            let value = bytes::Bytes::from((count.unwrap_or(0) + 1).to_string());
            let written = match &entry {
                Some(e) => claims.kv.update(&key, value, e.revision).await.map(|_| ()).map_err(|e| e.to_string()),
                None => claims.kv.create(&key, value).await.map(|_| ()).map_err(|e| e.to_string()),
            };
            match written {
                Ok(()) => return,
                Err(e) => tracing::debug!(seq, err = %e, "counting a give-back again"),
            }
        }
        tracing::warn!(seq, "cannot count a give-back: it counts as a delivery");
    }

    /// The request at `seq` left the stream: its give-backs are forgotten.
    pub(super) async fn forget_given_back(&self, seq: u64) {
        let Some(claims) = self.claims.get() else { return };
        if let Err(e) = claims.kv.purge(given_back_key(seq)).await {
            tracing::debug!(seq, err = %e, "cannot forget a request's give-backs");
        }
    }

    async fn tell_joiners(&self, subjects: Vec<String>, kind: Kind, said: String) {
        let subjects = self.queue.add_running_subscribers(subjects);
        let Some(running) = self.fleet.activity().running else { return };
        let r = Reply::progress(kind, &running.repo, &running.target).message(said);
        self.reporter.publish(&subjects, &r).await;
    }
}
