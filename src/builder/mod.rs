//! The NATS build worker: takes requests on `build.<repo>.>` (queue group), queues them, builds
//! one request at a time, and streams replies to each request's `reply_to`.
//!
//! Architecture invariant: knows NATS and the `nix`/`git` commands, never HTTP. What it builds
//! lands in the local store, which the cache reads directly, so it is served at once.

pub mod cli;
pub mod config;
pub mod eval;
pub mod exec;
pub mod generations;
pub mod graph;
pub mod job;
pub mod nixlog;
mod queue;
pub mod record;
pub mod transport;

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::fleet::Fleet;
use crate::metrics::{Metrics, Repo, RepoHost, RepoHostStatus, RepoStatus};
use crate::store::Store;
use config::{BuilderConfig, QueueKind};
use eval::Evaluated;
use exec::{BuildError, Exec};
use generations::Generations;
use job::{HostProgress, HostStatus, HostSummary, Phase, Reply, Status};
use queue::{Enqueued, Job, Queue};
use record::{Outcome, Recorder, now_seconds};
use transport::{Delivery, Transport};

/// Build log lines a progress reply carries at most (the newest).
const PROGRESS_LINES: usize = 20;

/// How long a final reply is retried while NATS is unreachable, after shutdown began.
const FINAL_REPLY_GRACE: Duration = Duration::from_secs(10);
/// What stopping a build cut by shutdown may take past the grace: its process group's
/// SIGTERM-to-SIGKILL time, then the final replies.
pub const SHUTDOWN_STOP_TIME: Duration = Duration::from_secs(25);

/// The build worker, connected (or connecting) to NATS.
pub struct Worker {
    config: Arc<BuilderConfig>,
    client: async_nats::Client,
    metrics: Arc<Metrics>,
    fleet: Arc<Fleet>,
    generations: Generations,
    exec: Exec,
    queue: Arc<Queue>,
    recorder: Recorder,
    /// When a reply last went out (the heartbeat's clock).
    last_reply: std::sync::Mutex<Instant>,
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
            git_cache_dir: config.git_cache_dir.clone(),
            version: Default::default(),
        };
        let queue = Arc::new(Queue::new(config.queue_size));
        let generations = Generations::new(&config.gcroots_dir, config.keep_generations);
        let recorder = Recorder {
            store,
            metrics: metrics.clone(),
            fleet: fleet.clone(),
            generations: generations.clone(),
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
            generations,
            exec,
            queue,
            recorder,
            last_reply: std::sync::Mutex::new(Instant::now()),
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
        let worker = Arc::new(self);
        // The record of generations comes back from the GC roots; closures from the store.
        tokio::spawn({
            let worker = worker.clone();
            async move {
                let repos: Vec<String> = worker.config.repos.iter().map(|r| r.name.clone()).collect();
                worker.recorder.recover(&repos).await;
            }
        });
        let ended = CancellationToken::new();
        tokio::spawn(worker.clone().keepalive(ended.clone()));
        let _ended = ended.drop_guard();
        let mut builds = tokio::spawn(worker.clone().build_loop(stop.clone(), cancel.clone()));
        loop {
            tokio::select! {
                delivery = transport.next(&worker.queue) => match delivery {
                    Some(d) => worker.receive(d).await,
                    None => break,
                },
                _ = stop.cancelled() => break,
            }
        }
        // Stop taking requests. Core: messages already delivered stay unanswered by us and go to
        // another builder only if they are re-sent; JetStream: what we hold is delivered again.
        transport.close().await;
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
        let _ = worker.client.flush().await;
    }

    /// Moves the fleet record into the shared bucket (made if missing), trying until NATS
    /// answers; false if hearth stops first.
    async fn share_record(&self, stop: &CancellationToken) -> bool {
        let js = async_nats::jetstream::new(self.client.clone());
        let s = &self.config.jetstream;
        loop {
            // The bucket's stream as a key-value bucket has it, made directly: the client's own
            // `create_key_value` asks for account details older servers (2.9) answer otherwise.
            let made = js
                .create_or_update_stream(async_nats::jetstream::stream::Config {
                    name: format!("KV_{}", s.bucket),
                    description: Some("hearth fleet record: one key per <repo>/<host>".into()),
                    subjects: vec![format!("$KV.{}.>", s.bucket)],
                    max_messages_per_subject: 1,
                    storage: async_nats::jetstream::stream::StorageType::File,
                    num_replicas: s.replicas,
                    allow_rollup: true,
                    deny_delete: true,
                    allow_direct: true,
                    discard: async_nats::jetstream::stream::DiscardPolicy::New,
                    ..Default::default()
                })
                .await
                .map_err(|e| e.to_string());
            let bucket = match made {
                Ok(_) => js.get_key_value(&s.bucket).await.map_err(|e| e.to_string()),
                Err(e) => Err(e),
            };
            match bucket {
                Ok(b) => {
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

    async fn receive(&self, msg: Delivery) {
        let ack = msg.ack.clone();
        let parsed = job::parse_request(&msg.subject, &msg.payload, |r| self.config.repo(r).is_some());
        let req = match parsed {
            Ok(req) => req,
            Err(rejected) => {
                let (why, req) = *rejected;
                let (repo, target) = req.as_ref().map(|r| (r.repo.as_str(), r.target.as_str())).unwrap_or(("", ""));
                let reply_to = req.as_ref().and_then(|r| r.reply_to.clone()).filter(|s| job::is_valid_reply_subject(s));
                let reply_to = reply_to.or_else(|| msg.reply.as_ref().map(|s| s.to_string()));
                let label = if self.config.repo(repo).is_some() { repo } else { "unknown" };
                self.metrics.build_rejected.get_or_create(&Repo { repo: label.to_owned() }).inc();
                // Request fields are untrusted: escaped, so they cannot forge log lines.
                tracing::warn!(
                    subject = %msg.subject.escape_debug(),
                    reason = %why.to_string().escape_debug(),
                    "build request rejected"
                );
                if let Some(to) = reply_to {
                    self.publish(&[to], &Reply::new(Status::Rejected, repo, target).message(why.to_string())).await;
                }
                if let Some(ack) = ack {
                    ack.term().await;
                }
                return;
            }
        };
        let reply_to = req.reply_to.clone().or_else(|| msg.reply.as_ref().map(|s| s.to_string()));
        let Some(repo) = self.config.repo(&req.repo) else { return };
        if let Some(a) = ack.as_ref().filter(|a| a.delivered > self.config.jetstream.max_deliver) {
            // Builders died building it, time after time: answered, never tried again.
            let why = format!(
                "delivered {} times without a result (the builders taking it stopped before it ended); not tried again",
                a.delivered - 1
            );
            tracing::warn!(repo = %req.repo, target = %req.target.escape_debug(), seq = a.sequence, "build request dropped after its last delivery");
            if let Some(to) = &reply_to {
                self.publish(
                    std::slice::from_ref(to),
                    &Reply::new(Status::Failed, &req.repo, &req.target).message(why),
                )
                .await;
                let _ = self.client.flush().await;
            }
            a.term().await;
            return;
        }
        if req.check {
            // A question, not a build: answered at once, counted nowhere.
            if let Some(to) = reply_to {
                let mut r = Reply::new(Status::Completed, &req.repo, &req.target)
                    .message(format!("repo `{}` is served here", req.repo));
                r.branch = Some(repo.branch.clone());
                r.repo_url = Some(job::without_credentials(&repo.url));
                self.publish(&[to], &r).await;
            }
            if let Some(ack) = ack {
                ack.done().await;
            }
            return;
        }
        let branch = req.branch.clone().unwrap_or_else(|| repo.branch.clone());
        let job = Job {
            repo: repo.clone(),
            target: req.target.clone(),
            branch,
            rev: req.rev.clone(),
            reply_to: reply_to.iter().cloned().collect(),
            acks: ack.iter().cloned().collect(),
        };
        let outcome = self.queue.push(job);
        self.metrics.build_queue.set(self.queue.waiting() as i64);
        self.show_activity(None);
        // Who asked, as their client says (`Hearth-Requested-By`): untrusted, so escaped.
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
            delivery = ack.as_ref().map_or(1, |a| a.delivered),
            "build request accepted"
        );
        let Some(to) = reply_to else { return };
        let reply = |status| Reply::new(status, &req.repo, &req.target);
        match outcome {
            Enqueued::Starting => {}
            Enqueued::Joined => {
                self.publish(&[to], &reply(Status::Progress).message("joined an identical build in progress")).await
            }
            Enqueued::Queued { position } => {
                let mut r = reply(Status::Progress).message(format!("queued at position {position}"));
                r.queue_position = Some(position);
                self.publish(&[to], &r).await;
            }
            Enqueued::Full | Enqueued::TooManyJoiners => {
                let why =
                    if outcome == Enqueued::Full { job::Rejection::QueueFull } else { job::Rejection::TooManyJoiners };
                self.metrics.build_rejected.get_or_create(&Repo { repo: req.repo.clone() }).inc();
                tracing::warn!(repo = %req.repo, target = %req.target, reason = %why, "build request rejected");
                self.publish(&[to], &reply(Status::Rejected).message(why.to_string())).await;
                if let Some(ack) = ack {
                    ack.term().await;
                }
            }
        }
    }

    async fn build_loop(self: Arc<Self>, stop: CancellationToken, cancel: CancellationToken) {
        loop {
            let job = tokio::select! {
                job = self.queue.next() => job,
                _ = stop.cancelled() => break,
            };
            self.metrics.build_queue.set(self.queue.waiting() as i64);
            self.metrics.build_in_progress.set(1);
            self.show_activity(Some(now_seconds()));
            self.run_job(&job, &cancel).await;
            self.queue.finish();
            self.show_activity(None);
            self.metrics.build_in_progress.set(0);
        }
        for job in self.queue.drain() {
            if !job.acks.is_empty() {
                // Durable: another builder (or this one, restarted) takes it.
                for ack in &job.acks {
                    ack.give_back().await;
                }
                continue;
            }
            let mut r = Reply::new(Status::Interrupted, &job.repo.name, &job.target)
                .message("interrupted: hearth stopped before this build started; send it again");
            r.branch = Some(job.branch.clone());
            self.publish_final(&job.reply_to, &r, &cancel).await;
        }
        self.metrics.build_queue.set(0);
    }

    /// Tells the fleet record (the page) what is running and queued; `since`: when the running
    /// build started, if one just did (else the time already recorded stays).
    fn show_activity(&self, since: Option<i64>) {
        let (running, queued) = self.queue.snapshot();
        let build = |n: queue::Named| crate::fleet::ActiveBuild { repo: n.repo, target: n.target, branch: n.branch };
        let since = if running.is_some() { since.or(self.fleet.activity().since) } else { None };
        self.fleet.set_activity(crate::fleet::Activity {
            running: running.map(build),
            since,
            queued: queued.into_iter().map(build).collect(),
        });
    }

    /// Subjects to reply to for the running job: its own and those of requests that joined it.
    fn subscribers(&self) -> Vec<String> {
        self.queue.running_subscribers()
    }

    async fn run_job(&self, job: &Job, cancel: &CancellationToken) {
        let repo = &job.repo.name;
        let base = |status| {
            let mut r = Reply::new(status, repo, &job.target);
            r.branch = Some(job.branch.clone());
            r
        };
        let started = Instant::now();
        tracing::info!(%repo, target = %job.target, branch = %job.branch, rev = job.rev.as_deref().unwrap_or("(head)"), "build started");
        self.publish(
            &self.subscribers(),
            &base(Status::Started).message(format!("building {} of {repo} at {}", job.target, job.branch)),
        )
        .await;

        let resolved = match self.exec.resolve(&job.repo.url, &job.branch, job.rev.as_deref(), cancel).await {
            Ok(r) => r,
            Err(BuildError::Shutdown) => return self.finish_interrupted(job, base(Status::Interrupted), cancel).await,
            Err(BuildError::Rejected(why)) => {
                self.metrics.build_rejected.get_or_create(&Repo { repo: repo.clone() }).inc();
                tracing::warn!(%repo, target = %job.target, branch = %job.branch, reason = %why, "build rejected");
                return self.conclude(base(Status::Rejected).message(why), cancel).await;
            }
            Err(e) => return self.finish_failed(job, base(Status::Failed).message(e.detail()), started, cancel).await,
        };
        let (flake, commit) = resolved;
        self.queue.set_running_commit(commit.clone());
        let base = |status| {
            let mut r = base(status);
            r.commit = commit.clone();
            r
        };
        // The flake's own host names: the only names that are built or become metric labels.
        let known = match self.exec.list_hosts(&flake, cancel).await {
            Ok(h) if h.is_empty() => {
                let r = base(Status::Failed).message("the flake has no nixosConfigurations");
                return self.finish_failed(job, r, started, cancel).await;
            }
            Ok(h) => h,
            Err(BuildError::Shutdown) => return self.finish_interrupted(job, base(Status::Interrupted), cancel).await,
            Err(e) => return self.finish_failed(job, base(Status::Failed).message(e.detail()), started, cancel).await,
        };
        let hosts = if job.target == "all" {
            known
        } else if known.contains(&job.target) {
            vec![job.target.clone()]
        } else {
            let hint = if known.len() <= 10 {
                format!("the flake defines: {}", known.join(", "))
            } else {
                format!("closest: {} (of {} hosts)", job::closest(&known, &job.target, 5).join(", "), known.len())
            };
            let message = format!("unknown host `{}` in {repo}; {hint}", job.target);
            self.metrics.build_rejected.get_or_create(&Repo { repo: repo.clone() }).inc();
            tracing::warn!(%repo, target = %job.target, commit = commit.as_deref().unwrap_or("-"), "build rejected: unknown host");
            return self.conclude(base(Status::Rejected).message(message), cancel).await;
        };

        // Only the deploy branch's builds are the hosts' state; another branch's are recorded
        // apart, under their branch.
        let deploy = job.branch == job.repo.branch;
        if deploy && job.target == "all" && job.rev.is_none() {
            // Hosts the deploy branch's newest commit no longer defines leave the record and
            // the gauges (their roots stay, as keep_generations says). A build of a pinned
            // commit (`rev`, maybe an older one) never drops a host: the bucket's gc keeps only
            // what the record names.
            for ((r, host), _) in self.fleet.snapshot() {
                if r == *repo && !hosts.contains(&host) {
                    self.metrics.host_last_success.remove(&RepoHost { repo: r.clone(), host });
                }
            }
            self.fleet.retain(repo, |host| hosts.iter().any(|h| h == host));
        }
        if deploy {
            for host in &hosts {
                self.recorder.seed_host_series(repo, host);
            }
        }
        if !deploy {
            self.generations.prune_branch_roots(
                std::slice::from_ref(repo),
                Duration::from_secs(generations::BRANCH_ROOT_DAYS * 86_400),
            );
        }
        let cx = record::Context { repo, branch: &job.branch, deploy, commit: commit.as_deref() };
        let (summaries, shutdown) = self.build_hosts(&flake, &hosts, &cx, &base, cancel).await;

        let ok = summaries.iter().all(|s| s.status.is_ok());
        let any_host_ok = deploy && summaries.iter().any(|s| s.status.is_ok());
        let built = summaries.len();
        let failed: Vec<String> =
            summaries.iter().filter(|s| s.status == HostStatus::Failure).map(|s| s.host.clone()).collect();
        let status = match (ok, shutdown) {
            (true, _) => Status::Completed,
            (false, true) => Status::Interrupted,
            (false, false) => Status::Failed,
        };
        let mut r = base(status);
        r.message = Some(if ok {
            format!("{} host(s) built", summaries.len())
        } else if shutdown {
            let done = summaries.iter().filter(|s| s.status != HostStatus::Interrupted).count();
            format!("interrupted by shutdown after {done} of {} host(s); send it again", summaries.len())
        } else {
            format!("{} of {} host(s) failed: {}", failed.len(), summaries.len(), failed.join(", "))
        });
        if let [only] = summaries.as_slice() {
            r.host = Some(only.host.clone());
            r.out_path = only.out_path.clone();
        }
        r.hosts = Some(summaries);
        r.duration_seconds = Some(started.elapsed().as_secs_f64());
        if shutdown {
            // No result: counted nowhere.
            if any_host_ok {
                self.metrics.build_last_success.get_or_create(&Repo { repo: repo.clone() }).set(now_seconds());
            }
        } else {
            self.count_build(repo, ok, any_host_ok);
        }
        let duration = format!("{:.1}s", started.elapsed().as_secs_f64());
        let commit = r.commit.as_deref().unwrap_or("-");
        if shutdown {
            tracing::warn!(%repo, target = %job.target, branch = %job.branch, %commit, %duration, "build interrupted by shutdown");
        } else if ok {
            tracing::info!(%repo, target = %job.target, branch = %job.branch, %commit, hosts = built, %duration, "build succeeded");
        } else {
            tracing::warn!(%repo, target = %job.target, branch = %job.branch, %commit, failed = %failed.join(","), %duration, reason = r.message.as_deref().unwrap_or(""), "build failed");
        }
        self.conclude(r, cancel).await;
    }

    /// Builds `hosts` of `flake`: evaluates them on up to `eval_workers` cores, reports the
    /// unchanged ones at once, realises the others in one build graph, and records each host's
    /// outcome. Returns the summaries in `hosts` order, and whether shutdown cut the build.
    async fn build_hosts(
        &self,
        flake: &str,
        hosts: &[String],
        cx: &record::Context<'_>,
        base: &(dyn Fn(Status) -> Reply + Sync),
        cancel: &CancellationToken,
    ) -> (Vec<HostSummary>, bool) {
        let started = Instant::now();
        let mut board = Board::new(hosts);
        let mut evaluated: Vec<(String, Evaluated, f64)> = Vec::new();
        let mut outcomes: HashMap<String, (Outcome, f64)> = HashMap::new();
        let mut shutdown = false;

        // Evaluation, on every core the config gives it.
        let interval = self.config.progress_interval;
        let mut last_sent: Option<Instant> = None;
        let mut results = eval::evaluate_all(&self.exec, flake, hosts, self.config.eval_workers, cancel);
        while let Some((host, result)) = results.next().await {
            let took = started.elapsed().as_secs_f64();
            match result {
                Ok(e) => {
                    let unchanged = cx.deploy && self.recorder.is_newest(cx.repo, host, &e.out).await;
                    if unchanged {
                        board.set(host, Phase::Unchanged, e.to_build.len());
                        outcomes.insert(host.to_owned(), (Outcome::Unchanged { out: e.out.clone() }, took));
                    } else {
                        board.set(host, Phase::Evaluated, e.to_build.len());
                        evaluated.push((host.to_owned(), e, took));
                    }
                }
                // The others end as soon, each without a result.
                Err(BuildError::Shutdown) => shutdown = true,
                Err(e) => {
                    board.set(host, Phase::Failed, 0);
                    tracing::warn!(repo = %cx.repo, %host, error = %e.to_string().lines().next().unwrap_or(""), "host failed to evaluate");
                    outcomes.insert(host.to_owned(), (Outcome::Failed { error: e.detail() }, took));
                }
            }
            if last_sent.is_none_or(|t| t.elapsed() >= interval) {
                let done = board.0.iter().filter(|p| p.phase != Phase::Evaluating).count();
                let mut r = base(Status::Progress).message(format!("evaluated {done} of {} host(s)", hosts.len()));
                r.progress = Some(board.0.clone());
                self.publish(&self.subscribers(), &r).await;
                last_sent = Some(Instant::now());
            }
        }
        drop(results);

        // One build graph for every evaluated host.
        let mut finished = graph::Finished::default();
        let mut tracker = graph::Tracker::new(evaluated.iter().map(|(h, e, _)| (h.as_str(), e)));
        let mut graph_error = None;
        if !shutdown && !evaluated.is_empty() {
            let mut r = match evaluated.as_slice() {
                [(only, _, _)] => {
                    let mut r = base(Status::Progress).message(format!("building {only}"));
                    r.host = Some(only.clone());
                    r
                }
                many => base(Status::Progress).message(format!("building {} host(s)", many.len())),
            };
            r.progress = Some(board.merged(&tracker));
            self.publish(&self.subscribers(), &r).await;
            let drvs = graph::nodes(evaluated.iter().map(|(_, e, _)| e));
            let (result, t, f) = self.realise_with_progress(&drvs, tracker, &board, base, cancel).await;
            (tracker, finished) = (t, f);
            match result {
                Ok(()) => {}
                Err(BuildError::Shutdown) => shutdown = true,
                Err(e) => graph_error = Some(e),
            }
        }
        let graph_start = started;
        for (host, e, eval_took) in evaluated {
            let took = finished.at(&host).map_or(started.elapsed().as_secs_f64(), |t| (t - graph_start).as_secs_f64());
            let took = took.max(eval_took);
            let outcome = if self.recorder.is_valid(&e.out).await {
                Outcome::Built { out: e.out }
            } else if shutdown {
                continue;
            } else {
                Outcome::Failed { error: self.why_failed(&host, &tracker, graph_error.as_ref(), cancel).await }
            };
            outcomes.insert(host, (outcome, took));
        }

        // Each host's outcome into the record, in the request's order.
        let mut summaries = Vec::new();
        for host in hosts {
            let Some((outcome, took)) = outcomes.remove(host) else {
                // Cut by shutdown: not a result; the host's state, counters and record stay.
                summaries.push(HostSummary {
                    host: host.clone(),
                    status: HostStatus::Interrupted,
                    out_path: None,
                    error: Some("interrupted by shutdown".into()),
                    duration_seconds: started.elapsed().as_secs_f64(),
                    changes: None,
                    uploaded: None,
                });
                continue;
            };
            let summary = self.recorder.host(cx, host, outcome, took).await;
            let label = match summary.status {
                HostStatus::Success => "success",
                HostStatus::Unchanged => "unchanged",
                HostStatus::Failure => "failure",
                HostStatus::Interrupted => "interrupted",
            };
            let mut r = base(Status::Progress).message(format!("{host}: {label}"));
            r.host = Some(host.clone());
            r.out_path = summary.out_path.clone();
            r.duration_seconds = Some(summary.duration_seconds);
            self.publish(&self.subscribers(), &r).await;
            summaries.push(summary);
        }
        (summaries, shutdown)
    }

    /// Runs the build graph, sending every host's progress (and the newest build log lines) at
    /// most every `progress_interval`.
    async fn realise_with_progress(
        &self,
        drvs: &[String],
        tracker: graph::Tracker,
        board: &Board,
        base: &(dyn Fn(Status) -> Reply + Sync),
        cancel: &CancellationToken,
    ) -> (Result<(), BuildError>, graph::Tracker, graph::Finished) {
        struct Live {
            tracker: graph::Tracker,
            lines: VecDeque<String>,
            changed: bool,
        }
        let live = std::sync::Mutex::new(Live { tracker, lines: VecDeque::new(), changed: false });
        let done = tokio::sync::Notify::new();
        let mut finished = graph::Finished::default();
        let realise = async {
            let mut on_event = |event: nixlog::Event| {
                let Ok(mut l) = live.lock() else { return };
                l.tracker.observe(&event);
                if let nixlog::Event::BuildLine { drv, line } = &event {
                    if l.lines.len() == PROGRESS_LINES {
                        l.lines.pop_front();
                    }
                    l.lines.push_back(format!("{}> {line}", nixlog::drv_name(drv)));
                }
                l.changed = true;
            };
            let r = graph::realise(&self.exec, drvs, cancel, &mut on_event).await;
            done.notify_one();
            r
        };
        let forward = async {
            let every = self.config.progress_interval.max(Duration::from_millis(50));
            loop {
                let last = tokio::select! {
                    _ = tokio::time::sleep(every) => false,
                    _ = done.notified() => true,
                };
                let update = live.lock().ok().filter(|l| l.changed).map(|mut l| {
                    l.changed = false;
                    let lines: Vec<String> = l.lines.drain(..).collect();
                    (board.merged(&l.tracker), lines)
                });
                if let Some((progress, lines)) = update {
                    finished.note(&progress);
                    let built = progress.iter().filter(|p| matches!(p.phase, Phase::Done | Phase::Unchanged)).count();
                    let mut r = base(Status::Progress);
                    r.message = Some(if lines.is_empty() {
                        format!("{built} of {} host(s) built", progress.len())
                    } else {
                        lines.join("\n")
                    });
                    r.progress = Some(progress);
                    self.publish(&self.subscribers(), &r).await;
                }
                if last {
                    break;
                }
            }
        };
        let (result, ()) = tokio::join!(realise, forward);
        let tracker = match live.into_inner() {
            Ok(l) => l.tracker,
            Err(poisoned) => poisoned.into_inner().tracker,
        };
        (result, tracker, finished)
    }

    /// Why `host`'s system is not in the store after the graph: the derivation of its closure
    /// that failed, with the tail of its own build log (`nix log`), else what the graph said.
    async fn why_failed(
        &self,
        host: &str,
        tracker: &graph::Tracker,
        graph_error: Option<&BuildError>,
        cancel: &CancellationToken,
    ) -> String {
        let failed = tracker.failed_for(host);
        if let Some(drv) = failed.first() {
            let more = match failed.len() {
                1 => String::new(),
                n => format!(" (and {} more of its derivations)", n - 1),
            };
            let tail = self.exec.log_tail(drv, cancel).await.unwrap_or_default();
            return format!("building {drv} failed{more}\n{tail}").trim_end().to_owned();
        }
        let said: Vec<&str> = tracker.errors().iter().rev().take(5).map(String::as_str).collect();
        let said: Vec<&str> = said.into_iter().rev().collect();
        match graph_error {
            Some(BuildError::Failed { .. }) | None if !said.is_empty() => said.join("\n"),
            Some(e) => e.to_string(),
            None => "the build ended without this host's system".to_owned(),
        }
    }

    async fn finish_interrupted(&self, job: &Job, reply: Reply, cancel: &CancellationToken) {
        tracing::warn!(repo = %job.repo.name, target = %job.target, branch = %job.branch, "build interrupted by shutdown");
        let reply = reply.message("interrupted by shutdown before any host was built; send it again");
        self.conclude(reply, cancel).await;
    }

    async fn finish_failed(&self, job: &Job, mut reply: Reply, started: Instant, cancel: &CancellationToken) {
        reply.duration_seconds = Some(started.elapsed().as_secs_f64());
        self.count_build(&job.repo.name, false, false);
        tracing::warn!(
            repo = %job.repo.name,
            target = %job.target,
            branch = %job.branch,
            duration = %format!("{:.1}s", started.elapsed().as_secs_f64()),
            reason = %reply.message.as_deref().unwrap_or("").lines().next().unwrap_or(""),
            "build failed"
        );
        self.conclude(reply, cancel).await;
    }

    /// Ends the running job with `reply`: its final reply, then (JetStream) its requests leave
    /// the stream. A build cut by shutdown is no result: with JetStream its requests go back to
    /// the stream (another builder, or this one restarted, builds them) and their clients are
    /// told so instead of getting a final reply.
    async fn conclude(&self, reply: Reply, cancel: &CancellationToken) {
        let acks = self.queue.running_acks();
        if reply.status == Status::Interrupted && !acks.is_empty() {
            let mut r = reply.clone();
            r.status = Status::Progress;
            r.message = Some("this builder stopped before the build ended; the request goes back to the JetStream queue and is built again".into());
            self.publish_final(&self.subscribers(), &r, cancel).await;
            for ack in acks {
                tracing::warn!(
                    seq = ack.sequence,
                    "build cut by shutdown: the request goes back to the JetStream queue"
                );
                ack.give_back().await;
            }
            return;
        }
        self.publish_final(&self.subscribers(), &reply, cancel).await;
        for ack in acks {
            ack.done().await;
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
                _ = ended.cancelled() => return,
            }
            // A record shared with other builders changes under us: the gauges follow it.
            if self.config.queue == QueueKind::JetStream && self.fleet.version() != record_seen {
                record_seen = self.fleet.version();
                seed_metrics(&self.config, &self.metrics, &self.fleet);
            }
            if last_ack.elapsed() >= ack_every {
                for ack in self.queue.running_acks() {
                    ack.working().await;
                }
                last_ack = Instant::now();
            }
            let subscribers = self.subscribers();
            let silent = self.last_reply.lock().map(|t| t.elapsed()).unwrap_or_default();
            if !subscribers.is_empty() && silent >= heartbeat {
                let running = self.fleet.activity();
                let (repo, target) = running.running.map(|b| (b.repo, b.target)).unwrap_or_default();
                let since = running.since.map(|s| now_seconds() - s).unwrap_or(0);
                let r = Reply::new(Status::Progress, &repo, &target).message(format!("still building ({since}s)"));
                self.publish(&subscribers, &r).await;
            }
            if last_queue_note.elapsed() >= heartbeat {
                for (position, to) in self.queue.waiting_subscribers() {
                    let mut r = Reply::new(Status::Progress, "", "").message(format!("queued at position {position}"));
                    r.queue_position = Some(position);
                    self.send(&to, &r).await;
                }
                last_queue_note = Instant::now();
            }
        }
    }

    /// Counts a finished build; `any_host_ok`: a host of the deploy branch built (a repo with one
    /// broken host still builds the others, and HearthHostBroken names the broken one).
    fn count_build(&self, repo: &str, ok: bool, any_host_ok: bool) {
        let status = if ok { "success" } else { "failure" };
        self.metrics.builds.get_or_create(&RepoStatus { repo: repo.to_owned(), status: status.into() }).inc();
        let label = Repo { repo: repo.to_owned() };
        self.metrics.build_last.get_or_create(&label).set(now_seconds());
        if any_host_ok {
            self.metrics.build_last_success.get_or_create(&label).set(now_seconds());
        }
    }

    /// Publishes `reply` to `to`; the running build's replies restart the heartbeat's clock.
    async fn publish(&self, to: &[String], reply: &Reply) {
        if let Ok(mut t) = self.last_reply.lock() {
            *t = Instant::now();
        }
        self.send(to, reply).await;
    }

    async fn send(&self, to: &[String], reply: &Reply) {
        // Replies over the server's max payload would be refused: cut log tails to fit.
        let max = self.client.server_info().max_payload;
        let max = if max == 0 { 1 << 20 } else { max };
        let payload = bytes::Bytes::from(job::encode_within(reply, max.saturating_sub(512)));
        for subject in to {
            if let Err(e) = self.client.publish(subject.clone(), payload.clone()).await {
                tracing::warn!(%subject, err = %e, "cannot publish reply");
            }
        }
    }

    /// Publishes a final reply and waits until NATS has it: while NATS is down the client holds
    /// the message and sends it on reconnect.
    async fn publish_final(&self, to: &[String], reply: &Reply, cancel: &CancellationToken) {
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

/// Every host's progress outside the build graph: evaluating, evaluated, failed in
/// evaluation, unchanged.
struct Board(Vec<HostProgress>);

impl Board {
    fn new(hosts: &[String]) -> Self {
        Board(
            hosts
                .iter()
                .map(|h| HostProgress {
                    host: h.clone(),
                    phase: Phase::Evaluating,
                    built: 0,
                    to_build: 0,
                    building: Vec::new(),
                })
                .collect(),
        )
    }

    fn set(&mut self, host: &str, phase: Phase, to_build: usize) {
        if let Some(p) = self.0.iter_mut().find(|p| p.host == host) {
            p.phase = phase;
            p.to_build = to_build;
        }
    }

    /// The board with the graph's hosts as the tracker has them.
    fn merged(&self, tracker: &graph::Tracker) -> Vec<HostProgress> {
        let live = tracker.progress();
        self.0
            .iter()
            .map(|p| match (p.phase, live.iter().find(|l| l.host == p.host)) {
                (Phase::Evaluated, Some(l)) => l.clone(),
                _ => p.clone(),
            })
            .collect()
    }
}

/// At startup: every configured repo's build series exist at 0, and what the record knows is
/// in the gauges (last build and last success times, each host's last result), so that a
/// restart neither hides a failure nor resets a time to 0.
fn seed_metrics(config: &BuilderConfig, metrics: &Metrics, fleet: &Fleet) {
    for repo in &config.repos {
        for status in ["success", "failure"] {
            let _ = metrics.builds.get_or_create(&RepoStatus { repo: repo.name.clone(), status: status.into() });
        }
    }
    for ((repo, host), record) in fleet.snapshot() {
        if config.repo(&repo).is_none() {
            continue;
        }
        let Some(last) = &record.last_build else { continue };
        for status in ["success", "failure"] {
            let labels = RepoHostStatus { repo: repo.clone(), host: host.clone(), status: status.into() };
            let _ = metrics.build_hosts.get_or_create(&labels);
        }
        let ok = last.status == "success";
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
