//! The NATS build worker: takes requests on `build.<repo>.>` (queue group or JetStream),
//! queues them, builds one request at a time, and streams replies to each request's `reply_to`.
//!
//! A request's trip, one room each: `plan.rs` (commit, hosts, target) → `eval.rs` (each host's
//! system, on every core) → `graph.rs` (one build graph, and why a host failed) → `record.rs`
//! (roots, generations, changes, the fleet record, metrics, the bucket) → `reply.rs` (who
//! hears it, how often, and the final reply). [`Worker::run_job`] is that sequence; `hosts.rs`
//! runs its middle (eval → graph → record) for a plan's hosts.
//!
//! Architecture invariant: knows NATS and the `nix`/`git` commands, never HTTP. What it builds
//! lands in the local store, which the cache reads directly, so it is served at once.

pub mod claim;
pub mod cli;
pub mod client;
pub mod config;
pub mod error;
pub mod eval;
pub mod exec;
pub mod generations;
pub mod graph;
mod hosts;
pub mod job;
pub mod nixlog;
pub mod plan;
mod queue;
pub mod record;
pub mod reply;
mod sharing;
pub mod transport;

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use crate::fleet::{BuildResult, Fleet};
use crate::metrics::{Metrics, Repo, RepoHost, RepoStatus};
use crate::store::Store;
use config::{BuilderConfig, QueueKind};
use exec::Exec;
use job::{BuildRequest, HostSummary, Kind, Reply, Status};
use plan::Ending;
use queue::{Enqueued, Job, Queue};
use record::{Recorder, now_seconds};
use reply::{Heading, Reporter};
use transport::{Delivery, Transport};
/// What stopping a build cut by shutdown may take past the grace: its process group's
/// SIGTERM-to-SIGKILL time, then the final replies.
pub const SHUTDOWN_STOP_TIME: Duration = Duration::from_secs(25);

/// The build worker, connected (or connecting) to NATS.
pub struct Worker {
    config: Arc<BuilderConfig>,
    client: async_nats::Client,
    metrics: Arc<Metrics>,
    fleet: Arc<Fleet>,
    exec: Exec,
    queue: Arc<Queue>,
    recorder: Recorder,
    reporter: Reporter,
    /// Claims of builds in the shared record (JetStream), once it is open.
    claims: std::sync::OnceLock<claim::Claims>,
    /// The running build's claim.
    held: tokio::sync::Mutex<Option<claim::Held>>,
    /// The builders whose presence the metrics show.
    counted_builders: std::sync::Mutex<std::collections::BTreeSet<String>>,
    /// Told when what this builder runs changes: its presence is written at once.
    presence_changed: tokio::sync::Notify,
    /// The presence last written into the shared record, and when.
    announced: tokio::sync::Mutex<Option<(crate::fleet::Presence, Instant)>>,
}

impl Worker {
    /// Sets up the NATS client; it connects in the background and reconnects forever, so the
    /// cache starts even while NATS is down.
    pub async fn connect(
        config: BuilderConfig,
        store: Arc<Store>,
        metrics: Arc<Metrics>,
        fleet: Arc<Fleet>,
        uploader: Option<(Arc<crate::bucket::upload::Uploader>, usize)>,
    ) -> anyhow::Result<Self> {
        let options = config
            .auth
            .options()
            .await
            .context("cannot load NATS credentials")?
            .name("hearth-builder")
            .retry_on_initial_connect()
            .max_reconnects(None)
            .event_callback({
                let metrics = metrics.clone();
                move |event| {
                    let metrics = metrics.clone();
                    async move {
                        match event {
                            async_nats::Event::Connected => {
                                metrics.builder_nats_connected.set(1);
                            }
                            async_nats::Event::Disconnected => {
                                metrics.builder_nats_connected.set(0);
                            }
                            _ => {}
                        }
                        tracing::info!(%event, "nats");
                    }
                }
            });
        let client = options
            .connect(&config.nats_url)
            .await
            .with_context(|| format!("cannot connect to {}", config.nats_url))?;
        let connected = client.connection_state() == async_nats::connection::State::Connected;
        metrics.builder_nats_connected.set(i64::from(connected));
        seed_metrics(&config, &metrics, &fleet);
        let exec = Exec {
            nix: config.nix.clone(),
            timeout: config.build_timeout,
            gcroots_dir: config.gcroots_dir.clone(),
            eval_max_memory: config.eval_max_memory,
            git_cache_dir: config.git_cache_dir.clone(),
            version: Default::default(),
        };
        let queue = Arc::new(Queue::new(config.queue_size));
        let reporter = Reporter::new(client.clone(), queue.clone(), config.name.clone());
        let generations = generations::Generations::new(&config.gcroots_dir, config.keep_generations);
        let recorder = Recorder {
            store,
            metrics: metrics.clone(),
            fleet: fleet.clone(),
            generations,
            exec: exec.clone(),
            name: config.name.clone(),
            keep_generations: config.keep_generations,
            uploader,
        };
        Ok(Self {
            config: Arc::new(config),
            client,
            metrics,
            fleet,
            exec,
            reporter,
            queue,
            recorder,
            claims: std::sync::OnceLock::new(),
            held: tokio::sync::Mutex::new(None),
            counted_builders: Default::default(),
            presence_changed: tokio::sync::Notify::new(),
            announced: tokio::sync::Mutex::new(None),
        })
    }

    /// Takes requests until `stop`. Then the running build gets `grace` to finish before it is
    /// stopped ([`SHUTDOWN_STOP_TIME`] at most) and reported `interrupted`, as are the builds
    /// still waiting.
    pub async fn run(self, stop: CancellationToken, grace: Duration) {
        let cancel = CancellationToken::new();
        if self.config.queue == QueueKind::JetStream && !self.share_record(&stop).await {
            return;
        }
        // The record of generations comes back from the GC roots (closures from the store)
        // before any request is taken: recovery and builds never write the record at once.
        let repos: Vec<String> = self.config.repos.iter().map(|r| r.name.clone()).collect();
        tokio::select! {
            () = self.recorder.recover(&repos) => {}
            _ = stop.cancelled() => return,
        }
        let mut transport = Transport::open(&self.client, &self.config).await;
        // A round trip makes sure the server has our subscriptions before we say we listen.
        tokio::select! {
            r = self.client.flush() => if let Err(e) = r {
                tracing::warn!(err = %e, "cannot reach NATS yet; requests are taken once it is back");
            },
            _ = stop.cancelled() => return,
        }
        tracing::info!(
            repos = self.config.repos.len(),
            from = %transport.describe(),
            builder = %self.config.name,
            eval_workers = self.config.eval_workers,
            "builder listening"
        );
        self.metrics.builder_ready.set(1);
        let worker = Arc::new(self);
        tokio::spawn(worker.clone().seed_defined_hosts(stop.clone()));
        let ended = CancellationToken::new();
        tokio::spawn(worker.clone().keepalive(ended.clone()));
        let _ended = ended.drop_guard();
        let mut builds = tokio::spawn(worker.clone().build_loop(stop.clone(), cancel.clone()));
        // `next` returns at `stop`, but only once a pull it asked for has ended: a request the
        // server hands out meanwhile is taken here and given back, never left to wait out its
        // ack wait (which would use one of its deliveries up).
        while let Some(d) = transport.next(|| worker.queue.idle(), &stop).await {
            worker.receive(d).await;
        }
        // Stop taking requests. Core: messages already delivered stay unanswered by us and go to
        // another builder only if they are re-sent; JetStream: what we hold is delivered again.
        transport.close().await;
        worker.metrics.builder_ready.set(0);
        if !builds.is_finished() {
            tracing::info!(
                grace_seconds = grace.as_secs(),
                "taking no new builds; the running build gets the shutdown grace"
            );
        }
        tokio::select! {
            _ = &mut builds => {}
            _ = tokio::time::sleep(grace) => {
                tracing::warn!(grace_seconds = grace.as_secs(), "stopping the running build: the shutdown grace is over");
                cancel.cancel();
                let _ = builds.await;
            }
        }
        // What waits here (taken before or while the build loop ended) is answered once both
        // loops are over, so nothing can be queued after it.
        worker.answer_waiting(&cancel).await;
        worker.withdraw().await;
        let _ = worker.client.flush().await;
    }

    /// Makes every host each repo's deploy branch defines have its build series at 0 (not only
    /// hosts already in the record or seen in an `all` build), so that a new host's first
    /// failure is an increase an alert sees. In the background; a repo it cannot read now is
    /// seeded by its next build.
    async fn seed_defined_hosts(self: Arc<Self>, stop: CancellationToken) {
        for repo in &self.config.repos {
            let listed = async {
                let (flake, _) = self.exec.resolve(&repo.url, &repo.branch, None, &stop).await?;
                self.exec.list_hosts(&flake, &stop).await
            };
            match listed.await {
                Ok(hosts) => {
                    for host in &hosts {
                        self.metrics.seed_host_series(&repo.name, host);
                    }
                    tracing::debug!(repo = %repo.name, hosts = hosts.len(), "build series of every defined host exist");
                }
                Err(e) => tracing::debug!(repo = %repo.name, err = %e, "cannot list the repo's hosts yet"),
            }
        }
    }

    /// Moves the fleet record into the shared bucket (made if missing), trying until NATS
    /// answers; false if hearth stops first.
    async fn share_record(&self, stop: &CancellationToken) -> bool {
        let s = &self.config.jetstream;
        loop {
            match crate::fleet::open_shared(&self.client, &s.bucket, s.replicas).await {
                Ok(b) => {
                    let _ = self.claims.set(claim::Claims { kv: b.clone(), me: self.config.name.clone() });
                    self.fleet.share(b).await;
                    tracing::info!(bucket = %s.bucket, "the fleet record is shared in JetStream");
                    return true;
                }
                Err(e) => tracing::warn!(bucket = %s.bucket, err = %e, "cannot open the shared fleet record yet"),
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                _ = stop.cancelled() => return false,
            }
        }
    }

    /// Takes one delivered request: refused, dropped after its last delivery, answered (a
    /// `check`), or queued.
    async fn receive(&self, msg: Delivery) {
        let parsed = job::parse_request(&msg.subject, &msg.payload, |r| self.config.repo(r).is_some());
        let req = match parsed {
            Ok(req) => req,
            Err(rejected) => return self.refuse(&msg, *rejected).await,
        };
        let reply_to = req.reply_to.clone().or_else(|| msg.reply.clone());
        let Some(repo) = self.config.repo(&req.repo) else { return };
        if let Some(a) = msg.ack.as_ref() {
            // A delivery given back on a graceful stop is not one that ended without an answer.
            let given_back = self.given_back(a.sequence).await;
            if a.delivered - given_back > self.config.jetstream.max_deliver {
                return self.give_up(&req, reply_to, a).await;
            }
        }
        if req.check {
            // A question, not a build: answered at once, counted nowhere.
            if let Some(to) = reply_to {
                let mut r = Reply::new(Status::Completed, &req.repo, &req.target)
                    .message(format!("repo `{}` is served here", req.repo));
                r.branch = Some(repo.branch.clone());
                r.repo_url = Some(job::without_credentials(&repo.url));
                self.reporter.publish(&[to], &r).await;
            }
            if let Some(ack) = &msg.ack {
                ack.done().await;
            }
            return;
        }
        let job = Job {
            repo: repo.clone(),
            target: req.target.clone(),
            branch: req.branch.clone().unwrap_or_else(|| repo.branch.clone()),
            rev: req.rev.clone(),
            once_per: req.once_per_seconds,
            reply_to: reply_to.iter().cloned().collect(),
            acks: msg.ack.iter().cloned().collect(),
        };
        let outcome = self.queue.push(job);
        self.metrics.build_queue.set(self.queue.waiting() as i64);
        self.show_activity(None);
        log_accepted(&msg, &req, &outcome);
        if let Some(to) = reply_to {
            self.answer_enqueued(&req, to, outcome, msg.ack.as_ref()).await;
        }
    }

    /// Refuses a request that did not parse or validate: counted, logged (escaped: its fields
    /// are untrusted), answered where it says, and dropped from the stream.
    async fn refuse(&self, msg: &Delivery, (why, req): (job::Rejection, Option<BuildRequest>)) {
        let (repo, target) = req.as_ref().map(|r| (r.repo.as_str(), r.target.as_str())).unwrap_or(("", ""));
        let reply_to = req.as_ref().and_then(|r| r.reply_to.clone()).filter(|s| job::is_valid_reply_subject(s));
        let reply_to = reply_to.or_else(|| msg.reply.clone());
        let label = if self.config.repo(repo).is_some() { repo } else { "unknown" };
        self.metrics.build_rejected.get_or_create(&Repo { repo: label.to_owned() }).inc();
        tracing::warn!(
            subject = %msg.subject.escape_debug(),
            reason = %why.to_string().escape_debug(),
            "build request rejected"
        );
        if let Some(to) = reply_to {
            self.reporter.publish(&[to], &Reply::new(Status::Rejected, repo, target).message(why.to_string())).await;
        }
        if let Some(ack) = &msg.ack {
            ack.term().await;
        }
    }

    /// Answers a request builders died building, time after time: never tried again.
    async fn give_up(&self, req: &BuildRequest, reply_to: Option<String>, ack: &transport::Ack) {
        let why = format!(
            "delivered {} times without a result (the builders taking it stopped before it ended); not tried again",
            ack.delivered - 1 - self.given_back(ack.sequence).await
        );
        tracing::warn!(repo = %req.repo, target = %req.target.escape_debug(), seq = ack.sequence, "build request dropped after its last delivery");
        if let Some(to) = reply_to {
            let r = Reply::new(Status::Failed, &req.repo, &req.target).message(why);
            self.reporter.publish(&[to], &r).await;
            let _ = self.client.flush().await;
        }
        ack.term().await;
        self.forget_given_back(ack.sequence).await;
    }

    /// Tells a queued request where it stands: joined, waiting at a place, or refused.
    async fn answer_enqueued(&self, req: &BuildRequest, to: String, outcome: Enqueued, ack: Option<&transport::Ack>) {
        let progress = |kind| Reply::progress(kind, &req.repo, &req.target);
        match outcome {
            Enqueued::Starting => {}
            Enqueued::Joined => {
                let r = progress(Kind::Joined).message("joined an identical build in progress");
                self.reporter.publish(&[to], &r).await
            }
            Enqueued::Queued { position } => self.reporter.publish(&[to], &queued(req, position)).await,
            Enqueued::Full | Enqueued::TooManyJoiners => {
                let why =
                    if outcome == Enqueued::Full { job::Rejection::QueueFull } else { job::Rejection::TooManyJoiners };
                self.metrics.build_rejected.get_or_create(&Repo { repo: req.repo.clone() }).inc();
                tracing::warn!(repo = %req.repo, target = %req.target, reason = %why, "build request rejected");
                let r = Reply::new(Status::Rejected, &req.repo, &req.target).message(why.to_string());
                self.reporter.publish(&[to], &r).await;
                if let Some(ack) = ack {
                    ack.term().await;
                }
            }
        }
    }

    async fn build_loop(self: Arc<Self>, stop: CancellationToken, cancel: CancellationToken) {
        loop {
            let job = tokio::select! {
                // A request taken as the builder stops waits to be given back, not built.
                biased;
                _ = stop.cancelled() => break,
                job = self.queue.next() => job,
            };
            self.metrics.build_queue.set(self.queue.waiting() as i64);
            self.metrics.build_in_progress.set(1);
            self.show_activity(Some(now_seconds()));
            self.run_job(&job, &cancel).await;
            self.queue.finish();
            self.show_activity(None);
            self.metrics.build_in_progress.set(0);
        }
    }

    /// Stopping: every request still waiting here goes back to the JetStream queue (counted as
    /// given back, so it keeps its deliveries) or, with core NATS, is told it was interrupted.
    async fn answer_waiting(&self, cancel: &CancellationToken) {
        for job in self.queue.drain() {
            if !job.acks.is_empty() {
                // Durable: another builder (or this one, restarted) takes it.
                for ack in &job.acks {
                    tracing::info!(
                        seq = ack.sequence,
                        "stopping before it started: the request goes back to the JetStream queue"
                    );
                    self.note_given_back(ack.sequence).await;
                    ack.give_back().await;
                }
                continue;
            }
            let mut r = Reply::new(Status::Interrupted, &job.repo.name, &job.target)
                .message("interrupted: hearth stopped before this build started; send it again");
            r.branch = Some(job.branch.clone());
            self.reporter.publish_final(&job.reply_to, &r, cancel).await;
        }
        self.metrics.build_queue.set(0);
    }

    /// Tells the fleet record (the page) what is running and queued; `since`: when the running
    /// build started, if one just did (else the time already recorded stays).
    fn show_activity(&self, since: Option<i64>) {
        let (running, queued) = self.queue.snapshot();
        let build = |n: queue::Named| crate::fleet::ActiveBuild { repo: n.repo, target: n.target, branch: n.branch };
        let now = self.fleet.activity();
        let since = if running.is_some() { since.or(now.since) } else { None };
        self.fleet.set_activity(crate::fleet::Activity {
            running: running.map(build),
            since,
            queued: queued.into_iter().map(build).collect(),
            waiting_in_stream: now.waiting_in_stream,
        });
        self.presence_changed.notify_one();
    }

    /// With a JetStream queue: how many requests wait in the stream for any builder, into the
    /// queue gauge (beside this builder's own) and the page.
    async fn count_stream_waiting(&self) {
        let s = &self.config.jetstream;
        let js = async_nats::jetstream::new(self.client.clone());
        let consumer =
            js.get_consumer_from_stream::<async_nats::jetstream::consumer::pull::Config, _, _>(&s.consumer, &s.stream);
        let info = match consumer.await {
            Ok(mut c) => c.info().await.ok().map(|i| (i.num_pending, i.delivered.stream_sequence)),
            Err(_) => None,
        };
        let Some((waiting, taken_seq)) = info else { return };
        if waiting > 0 {
            // Waiting clients work out their place from it.
            let state = job::QueueState { stream: s.stream.clone(), waiting, taken_seq };
            let payload = bytes::Bytes::from(serde_json::to_vec(&state).unwrap_or_default());
            if let Err(e) = self.client.publish(job::QUEUE_SUBJECT, payload).await {
                tracing::debug!(err = %e, "cannot say what waits in the queue");
            }
        }
        self.metrics.build_queue.set(self.queue.waiting() as i64 + i64::try_from(waiting).unwrap_or(i64::MAX));
        let mut activity = self.fleet.activity();
        activity.waiting_in_stream = Some(waiting);
        self.fleet.set_activity(activity);
    }

    /// One request's trip: plan → eval → graph → record → reply.
    async fn run_job(&self, job: &Job, cancel: &CancellationToken) {
        let started = Instant::now();
        let mut heading = Heading {
            repo: job.repo.name.clone(),
            target: job.target.clone(),
            branch: Some(job.branch.clone()),
            commit: None,
        };
        tracing::info!(repo = %job.repo.name, target = %job.target, branch = %job.branch, rev = job.rev.as_deref().unwrap_or("(head)"), "build started");
        let (name, delivery) = (&self.config.name, job.acks.iter().map(|a| a.delivered).max().unwrap_or(1));
        let what = if delivery > 1 {
            format!(
                "builder {name} took over building {} of {} at {} (delivery {delivery}: the builder before it stopped answering)",
                job.target, job.repo.name, job.branch
            )
        } else {
            format!("building {} of {} at {} on builder {name}", job.target, job.repo.name, job.branch)
        };
        self.reporter.running(&heading.reply(Status::Started).message(what)).await;
        let resolved = |c| {
            self.queue.set_running_commit(c);
            self.presence_changed.notify_one();
        };
        let plan = match plan::plan(&self.exec, job, cancel, resolved).await {
            Ok(plan) => plan,
            Err(unplanned) => {
                heading.commit = unplanned.commit;
                return self.end_unplanned(job, &heading, unplanned.ending, started, cancel).await;
            }
        };
        heading.commit = plan.commit.clone();
        if let sharing::Claim::Joined = self.claim(job, plan.commit.as_deref()).await {
            return;
        }
        if job.acks.iter().any(|a| a.delivered > 1)
            && plan.deploy
            && let Some(summaries) = self.recorder.recorded(&job.repo.name, &plan)
        {
            // Its build ended, but the request was delivered again (its builder stopped, or
            // lost NATS, before acknowledging it): the result is in the record.
            tracing::info!(repo = %job.repo.name, target = %job.target, commit = plan.commit.as_deref().unwrap_or("-"), "a request delivered again is answered from the record, not built again");
            let (status, message) = reply::final_reply(&summaries, false);
            let mut r = heading
                .reply(status)
                .message(format!("{message} (from the record: the request was delivered again after its build ended)"));
            r.hosts = Some(summaries);
            return self.conclude(r, cancel).await;
        }
        if let Some(within) = job.once_per.filter(|_| plan.deploy)
            && let Some(summaries) = self.recorder.recorded_within(&job.repo.name, &plan, within)
        {
            let commit = plan.commit.as_deref().unwrap_or("-");
            tracing::info!(repo = %job.repo.name, target = %job.target, %commit, within, "built within the period already: answered from the record");
            let (status, message) = reply::final_reply(&summaries, false);
            let mut r = heading.reply(status).message(format!(
                "{message} (from the record: this commit was built within the last {within}s, so not again)"
            ));
            r.hosts = Some(summaries);
            return self.conclude(r, cancel).await;
        }
        self.recorder.prepare(&job.repo.name, &plan, job.target == "all" && job.rev.is_none());
        let built = self.build_hosts(&plan, job, &heading, cancel).await;
        self.end_built(job, &heading, built, started, cancel).await;
    }

    /// Ends a request that stopped before any host was built.
    async fn end_unplanned(
        &self,
        job: &Job,
        heading: &Heading,
        ending: Ending,
        started: Instant,
        cancel: &CancellationToken,
    ) {
        let (repo, target, branch) = (&job.repo.name, &job.target, &job.branch);
        let commit = heading.commit.as_deref().unwrap_or("-");
        let reply = match ending {
            Ending::Interrupted => {
                tracing::warn!(%repo, %target, %branch, "build interrupted by shutdown");
                heading
                    .reply(Status::Interrupted)
                    .message("interrupted by shutdown before any host was built; send it again")
            }
            Ending::Rejected(why) => {
                self.metrics.build_rejected.get_or_create(&Repo { repo: repo.clone() }).inc();
                tracing::warn!(%repo, %target, %branch, %commit, reason = %why, "build rejected");
                heading.reply(Status::Rejected).message(why)
            }
            Ending::Failed(why) => {
                let mut r = heading.reply(Status::Failed).message(why);
                r.duration_seconds = Some(started.elapsed().as_secs_f64());
                self.count_build(repo, false, false);
                let reason = r.message.as_deref().unwrap_or("").lines().next().unwrap_or("").to_owned();
                let duration = format!("{:.1}s", started.elapsed().as_secs_f64());
                tracing::warn!(%repo, %target, %branch, %duration, %reason, "build failed");
                r
            }
        };
        self.conclude(reply, cancel).await;
    }

    /// Ends a request whose hosts were built (or cut by shutdown): counted, logged, answered.
    async fn end_built(
        &self,
        job: &Job,
        heading: &Heading,
        (summaries, shutdown): (Vec<HostSummary>, bool),
        started: Instant,
        cancel: &CancellationToken,
    ) {
        let (status, message) = reply::final_reply(&summaries, shutdown);
        let ok = status == Status::Completed;
        let any_host_ok = job.branch == job.repo.branch && summaries.iter().any(|s| s.status.is_ok());
        let repo = &job.repo.name;
        if shutdown {
            // No result: counted nowhere.
            if any_host_ok {
                self.metrics.build_last_success.get_or_create(&Repo { repo: repo.clone() }).set(now_seconds());
            }
        } else {
            self.count_build(repo, ok, any_host_ok);
        }
        let mut r = heading.reply(status).message(message);
        if let [only] = summaries.as_slice() {
            r.host = Some(only.host.clone());
            r.out_path = only.out_path.clone();
        }
        let hosts = summaries.len();
        let failed: Vec<&str> =
            summaries.iter().filter(|s| s.status == job::HostStatus::Failure).map(|s| s.host.as_str()).collect();
        let failed = failed.join(",");
        r.hosts = Some(summaries);
        r.duration_seconds = Some(started.elapsed().as_secs_f64());
        let duration = format!("{:.1}s", started.elapsed().as_secs_f64());
        let (target, branch, commit) = (&job.target, &job.branch, heading.commit.as_deref().unwrap_or("-"));
        let reason = r.message.as_deref().unwrap_or("");
        if shutdown {
            tracing::warn!(%repo, %target, %branch, %commit, %duration, "build interrupted by shutdown")
        } else if ok {
            tracing::info!(%repo, %target, %branch, %commit, %hosts, %duration, "build succeeded")
        } else {
            tracing::warn!(%repo, %target, %branch, %commit, %failed, %duration, %reason, "build failed")
        }
        self.conclude(r, cancel).await;
    }

    /// Ends the running job with `reply`: its final reply, then (JetStream) its requests leave
    /// the stream. A build cut by shutdown is no result: with JetStream its requests go back to
    /// the stream (another builder, or this one restarted, builds them) and their clients are
    /// told so instead of getting a final reply.
    async fn conclude(&self, reply: Reply, cancel: &CancellationToken) {
        let given_back = reply.status == Status::Interrupted && !self.queue.running_acks().is_empty();
        // A request given back keeps its claim: the builder it goes to next takes it over.
        if !given_back {
            self.release_claim().await;
        }
        let acks = self.queue.running_acks();
        let subscribers = self.reporter.subscribers();
        if reply.status == Status::Interrupted && !acks.is_empty() {
            let mut r = reply.clone();
            (r.status, r.kind) = (Status::Progress, Some(Kind::Requeued));
            r.message = Some("this builder stopped before the build ended; the request goes back to the JetStream queue and is built again".into());
            self.reporter.publish_final(&subscribers, &r, cancel).await;
            for ack in acks {
                tracing::warn!(
                    seq = ack.sequence,
                    "build cut by shutdown: the request goes back to the JetStream queue"
                );
                self.note_given_back(ack.sequence).await;
                ack.give_back().await;
            }
            return;
        }
        // The result is in the record (shared too) before anyone is told it ended.
        self.recorder.settled().await;
        self.reporter.publish_final(&subscribers, &reply, cancel).await;
        for ack in acks {
            ack.done().await;
            self.forget_given_back(ack.sequence).await;
        }
    }

    /// Keeps every waiting client informed and every durable request held: a running build
    /// says at least every `heartbeat_seconds` that it goes on, waiting requests their place, and
    /// (JetStream) the running request is marked in progress every third of the ack wait.
    async fn keepalive(self: Arc<Self>, ended: CancellationToken) {
        let ack_every = Duration::from_secs(self.config.jetstream.ack_wait_seconds) / 3;
        let heartbeat = self.config.heartbeat;
        let tick = ack_every.min(Duration::from_secs(5)).min(heartbeat / 2);
        let mut last_ack = Instant::now();
        let mut last_queue_note = Instant::now();
        let mut record_seen = self.fleet.version();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(tick) => {}
                // What it runs changed: its presence is written now (the rest of a round is
                // gated by its own clocks, so an early round does no harm).
                () = self.presence_changed.notified() => {}
                _ = ended.cancelled() => return,
            }
            self.announce().await;
            self.follow_joiners().await;
            // A record shared with other builders changes under us: the gauges follow it.
            if self.config.queue == QueueKind::JetStream && self.fleet.version() != record_seen {
                record_seen = self.fleet.version();
                seed_metrics(&self.config, &self.metrics, &self.fleet);
                self.count_builders().await;
            }
            if self.config.queue == QueueKind::JetStream {
                self.count_stream_waiting().await;
            }
            if last_ack.elapsed() >= ack_every {
                for ack in self.queue.running_acks() {
                    ack.working().await;
                }
                last_ack = Instant::now();
            }
            let subscribers = self.reporter.subscribers();
            if !subscribers.is_empty() && self.reporter.silent_for() >= heartbeat {
                let running = self.fleet.activity();
                let (repo, target) = running.running.map(|b| (b.repo, b.target)).unwrap_or_default();
                let since = running.since.map(|s| now_seconds() - s).unwrap_or(0);
                let r = Reply::progress(Kind::Heartbeat, &repo, &target).message(format!("still building ({since}s)"));
                self.reporter.publish(&subscribers, &r).await;
            }
            if last_queue_note.elapsed() >= heartbeat {
                for (position, to) in self.queue.waiting_subscribers() {
                    let mut r = Reply::progress(Kind::Queued, "", "").message(format!("queued at position {position}"));
                    r.queue_position = Some(position);
                    self.reporter.send(&to, &r).await;
                }
                last_queue_note = Instant::now();
            }
        }
    }

    /// Counts a finished build; `any_host_ok`: a host of the deploy branch built (a repo with one
    /// broken host still builds the others, and HearthHostBroken names the broken one).
    fn count_build(&self, repo: &str, ok: bool, any_host_ok: bool) {
        let status = if ok { BuildResult::Success } else { BuildResult::Failure };
        self.metrics.builds.get_or_create(&RepoStatus { repo: repo.to_owned(), status: status.as_str().into() }).inc();
        let label = Repo { repo: repo.to_owned() };
        self.metrics.build_last.get_or_create(&label).set(now_seconds());
        if any_host_ok {
            self.metrics.build_last_success.get_or_create(&label).set(now_seconds());
        }
    }
}

/// A progress reply with a waiting request's place in the queue.
fn queued(req: &BuildRequest, position: usize) -> Reply {
    let mut r = Reply::progress(Kind::Queued, &req.repo, &req.target).message(format!("queued at position {position}"));
    r.queue_position = Some(position);
    r
}

/// Logs an accepted request; who asked, as their client says (`Hearth-Requested-By`), is
/// untrusted, so escaped.
fn log_accepted(msg: &Delivery, req: &BuildRequest, outcome: &Enqueued) {
    let requested_by = msg
        .headers
        .as_ref()
        .and_then(|h| h.get(job::REQUESTED_BY_HEADER))
        .map(|v| v.as_str().chars().take(200).collect::<String>())
        .unwrap_or_else(|| "(not said)".to_owned());
    tracing::info!(
        repo = %req.repo,
        target = %req.target.escape_debug(),
        rev = req.rev.as_deref().unwrap_or("(head)"),
        requested_by = %requested_by.escape_debug(),
        %outcome,
        delivery = msg.ack.as_ref().map_or(1, |a| a.delivered),
        "build request accepted"
    );
}

/// At startup: every configured repo's build series exist at 0, and what the record knows is
/// in the gauges (last build and last success times, each host's last result), so that a
/// restart neither hides a failure nor resets a time to 0.
fn seed_metrics(config: &BuilderConfig, metrics: &Metrics, fleet: &Fleet) {
    for repo in &config.repos {
        for status in BuildResult::ALL {
            let _ =
                metrics.builds.get_or_create(&RepoStatus { repo: repo.name.clone(), status: status.as_str().into() });
        }
    }
    for ((repo, host), record) in fleet.snapshot() {
        if config.repo(&repo).is_none() {
            continue;
        }
        let Some(last) = &record.last_build else { continue };
        metrics.seed_host_series(&repo, &host);
        let ok = last.status.is_success();
        let label = RepoHost { repo: repo.clone(), host };
        metrics.host_last_success.get_or_create(&label).set(i64::from(ok));
        if let (Some(bytes), Some(paths)) = (record.closure_bytes, record.closure_paths) {
            metrics.host_closure_bytes.get_or_create(&label).set(i64::try_from(bytes).unwrap_or(i64::MAX));
            metrics.host_closure_paths.get_or_create(&label).set(i64::try_from(paths).unwrap_or(i64::MAX));
        }
        let label = Repo { repo };
        let at = metrics.build_last.get_or_create(&label).get().max(last.at);
        metrics.build_last.get_or_create(&label).set(at);
        if ok {
            let at = metrics.build_last_success.get_or_create(&label).get().max(last.at);
            metrics.build_last_success.get_or_create(&label).set(at);
        }
    }
}
