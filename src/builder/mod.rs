//! The NATS build worker: takes requests on `build.<repo>.>` (queue group), queues them, builds
//! one request at a time, and streams replies to each request's `reply_to`.
//!
//! Architecture invariant: knows NATS and the `nix`/`git` commands, never HTTP. What it builds
//! lands in the local store, which the cache reads directly, so it is served at once.

pub mod cli;
pub mod config;
pub mod exec;
pub mod generations;
pub mod job;
mod queue;

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::fleet::{BranchBuild, Fleet, LastBuild};
use crate::metrics::{Metrics, Repo, RepoHost, RepoHostStatus, RepoStatus};
use crate::nix::closure_diff::{self, Changes};
use crate::nix::store_path::StorePath;
use crate::store::Store;
use config::BuilderConfig;
use exec::{BuildError, Exec};
use generations::Generations;
use job::{HostStatus, HostSummary, Reply, Status};
use queue::{Enqueued, Job, Queue};

/// How long a final reply is retried while NATS is unreachable, after shutdown began.
const FINAL_REPLY_GRACE: Duration = Duration::from_secs(10);
/// What stopping a build cut by shutdown may take past the grace: its process group's
/// SIGTERM-to-SIGKILL time, then the final replies.
pub const SHUTDOWN_STOP_TIME: Duration = Duration::from_secs(25);

/// The build worker, connected (or connecting) to NATS.
pub struct Worker {
    config: Arc<BuilderConfig>,
    client: async_nats::Client,
    store: Arc<Store>,
    metrics: Arc<Metrics>,
    fleet: Arc<Fleet>,
    generations: Generations,
    exec: Exec,
    queue: Arc<Queue>,
}

fn now_seconds() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

impl Worker {
    /// Sets up the NATS client; it connects in the background and reconnects forever, so the
    /// cache starts even while NATS is down.
    pub async fn connect(
        config: BuilderConfig,
        store: Arc<Store>,
        metrics: Arc<Metrics>,
        fleet: Arc<Fleet>,
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
        };
        let queue = Arc::new(Queue::new(config.queue_size));
        let generations = Generations::new(&config.gcroots_dir, config.keep_generations);
        Ok(Self { config: Arc::new(config), client, store, metrics, fleet, generations, exec, queue })
    }

    /// Takes requests until `stop`. Then the running build gets `grace` to finish before it is
    /// stopped ([`SHUTDOWN_STOP_TIME`] at most) and reported `interrupted`, as are the builds
    /// still waiting.
    pub async fn run(self, stop: CancellationToken, grace: Duration) {
        let cancel = CancellationToken::new();
        let mut subs = Vec::new();
        for repo in &self.config.repos {
            // `>`: a host name may hold dots, which NATS reads as more subject tokens.
            let subject = format!("build.{}.>", repo.name);
            match self.client.queue_subscribe(subject.clone(), self.config.queue_group.clone()).await {
                Ok(s) => subs.push(s),
                Err(e) => tracing::error!(%subject, err = %e, "cannot subscribe"),
            }
        }
        // A round trip makes sure the server has our subscriptions before we say we listen.
        tokio::select! {
            r = self.client.flush() => if let Err(e) = r {
                tracing::warn!(err = %e, "cannot reach NATS yet; requests are taken once it is back");
            },
            _ = stop.cancelled() => return,
        }
        tracing::info!(repos = self.config.repos.len(), group = %self.config.queue_group, "builder listening");
        let worker = Arc::new(self);
        // The record of generations comes back from the GC roots; closures from the store.
        tokio::spawn(worker.clone().recover());
        let mut builds = tokio::spawn(worker.clone().build_loop(stop.clone(), cancel.clone()));
        let mut incoming = futures::stream::select_all(subs);
        loop {
            tokio::select! {
                msg = incoming.next() => match msg {
                    Some(msg) => worker.receive(msg).await,
                    None => break,
                },
                _ = stop.cancelled() => break,
            }
        }
        // Stop taking requests; messages already delivered stay unanswered by us and go to
        // another builder in the group only if they are re-sent.
        for sub in incoming.iter_mut() {
            let _ = sub.unsubscribe().await;
        }
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

    async fn receive(&self, msg: async_nats::Message) {
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
                return;
            }
        };
        let reply_to = req.reply_to.clone().or_else(|| msg.reply.as_ref().map(|s| s.to_string()));
        let Some(repo) = self.config.repo(&req.repo) else { return };
        if req.check {
            // A question, not a build: answered at once, counted nowhere.
            if let Some(to) = reply_to {
                let mut r = Reply::new(Status::Completed, &req.repo, &req.target)
                    .message(format!("repo `{}` is served here", req.repo));
                r.branch = Some(repo.branch.clone());
                r.repo_url = Some(job::without_credentials(&repo.url));
                self.publish(&[to], &r).await;
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
                return self.publish_final(&self.subscribers(), &base(Status::Rejected).message(why), cancel).await;
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
            return self.publish_final(&self.subscribers(), &base(Status::Rejected).message(message), cancel).await;
        };

        // Only the deploy branch's builds are the hosts' state; another branch's are recorded
        // apart, under their branch.
        let deploy = job.branch == job.repo.branch;
        if deploy && job.target == "all" {
            // Hosts the flake no longer defines leave the record and the gauges (their roots
            // stay, as keep_generations says).
            for ((r, host), _) in self.fleet.snapshot() {
                if r == *repo && !hosts.contains(&host) {
                    self.metrics.host_last_success.remove(&RepoHost { repo: r.clone(), host });
                }
            }
            self.fleet.retain(repo, |host| hosts.iter().any(|h| h == host));
        }
        if deploy {
            for host in &hosts {
                self.seed_host_series(repo, host);
            }
        }
        if !deploy {
            self.generations.prune_branch_roots(
                std::slice::from_ref(repo),
                Duration::from_secs(generations::BRANCH_ROOT_DAYS * 86_400),
            );
        }
        let mut summaries = Vec::new();
        let mut shutdown = false;
        for host in &hosts {
            if shutdown {
                summaries.push(HostSummary {
                    host: host.clone(),
                    status: HostStatus::Interrupted,
                    out_path: None,
                    error: Some("interrupted by shutdown".into()),
                    duration_seconds: 0.0,
                    changes: None,
                });
                continue;
            }
            let mut r = base(Status::Progress).message(format!("building {host}"));
            r.host = Some(host.clone());
            self.publish(&self.subscribers(), &r).await;
            let host_start = Instant::now();
            let previous = self.generations.newest_link(repo, host);
            let result = self.build_with_progress(&flake, job, host, cancel).await;
            let duration = host_start.elapsed().as_secs_f64();
            self.metrics
                .build_duration
                .get_or_create(&RepoHost { repo: repo.clone(), host: host.clone() })
                .observe(duration);
            let (status, out_path, error) = match result {
                Ok(out) => (HostStatus::Success, Some(out), None),
                Err(BuildError::Shutdown) => {
                    shutdown = true;
                    (HostStatus::Interrupted, None, Some("interrupted by shutdown".to_owned()))
                }
                Err(e) => (HostStatus::Failure, None, Some(e.detail())),
            };
            if status == HostStatus::Interrupted {
                // Not a result: the host's state, counters and record stay as they were.
                let mut r = base(Status::Progress).message(format!("{host}: interrupted"));
                r.host = Some(host.clone());
                self.publish(&self.subscribers(), &r).await;
                summaries.push(HostSummary {
                    host: host.clone(),
                    status,
                    out_path: None,
                    error,
                    duration_seconds: duration,
                    changes: None,
                });
                continue;
            }
            let label = if status == HostStatus::Success { "success" } else { "failure" };
            // Only the deploy branch's builds are the host's state.
            if deploy {
                self.metrics
                    .build_hosts
                    .get_or_create(&RepoHostStatus { repo: repo.clone(), host: host.clone(), status: label.into() })
                    .inc();
                let ok = i64::from(status == HostStatus::Success);
                self.metrics
                    .host_last_success
                    .get_or_create(&RepoHost { repo: repo.clone(), host: host.clone() })
                    .set(ok);
            }
            let (generations, changes) = match &out_path {
                Some(out) if deploy => {
                    let (g, c) = self.record_generation(repo, host, out, previous.as_deref(), commit.as_deref()).await;
                    (Some(g), c)
                }
                // Another branch: what it would change against the host's newest deploy system,
                // for the reply (flake-update's commit message) only.
                Some(out) => {
                    let newest = self.generations.list(repo, host).last().map(|g| g.path.clone());
                    let changes = match self.closure(out).await {
                        Some(after) => self.diff(newest.as_deref(), &after).await,
                        None => None,
                    };
                    (None, changes)
                }
                None => (None, None),
            };
            let build = match &error {
                Some(e) => LastBuild::failed(now_seconds(), commit.clone(), e),
                None => LastBuild::new(label, now_seconds(), commit.clone()),
            };
            // One update (and one save) of the record per host build.
            self.fleet.update(repo, host, |h| {
                if !deploy {
                    let b = BranchBuild { build, out_path: out_path.clone() };
                    h.branches.insert(job.branch.clone(), b);
                    h.branches
                        .retain(|_, b| now_seconds() - b.build.at < generations::BRANCH_ROOT_DAYS as i64 * 86_400);
                    return;
                }
                h.last_build = Some(build);
                if let Some(g) = generations {
                    h.generations = g;
                }
                if let Some(c) = &changes {
                    h.set_changes(c);
                }
            });
            let duration_text = format!("{duration:.1}s");
            match &error {
                None => {
                    tracing::info!(%repo, %host, branch = %job.branch, out = out_path.as_deref().unwrap_or("-"), duration = %duration_text, "host built")
                }
                Some(e) => {
                    tracing::warn!(%repo, %host, branch = %job.branch, duration = %duration_text, error = %e.lines().next().unwrap_or(""), "host failed to build")
                }
            }
            let mut r = base(Status::Progress).message(format!("{host}: {label}"));
            r.host = Some(host.clone());
            r.out_path = out_path.clone();
            r.duration_seconds = Some(duration);
            self.publish(&self.subscribers(), &r).await;
            summaries.push(HostSummary {
                host: host.clone(),
                status,
                out_path,
                error,
                duration_seconds: duration,
                changes,
            });
        }

        let ok = summaries.iter().all(|s| s.status == HostStatus::Success);
        let any_host_ok = deploy && summaries.iter().any(|s| s.status == HostStatus::Success);
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
            self.record(repo, ok, any_host_ok);
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
        self.publish_final(&self.subscribers(), &r, cancel).await;
    }

    async fn finish_interrupted(&self, job: &Job, reply: Reply, cancel: &CancellationToken) {
        tracing::warn!(repo = %job.repo.name, target = %job.target, branch = %job.branch, "build interrupted by shutdown");
        let reply = reply.message("interrupted by shutdown before any host was built; send it again");
        self.publish_final(&self.subscribers(), &reply, cancel).await;
    }

    async fn finish_failed(&self, job: &Job, mut reply: Reply, started: Instant, cancel: &CancellationToken) {
        reply.duration_seconds = Some(started.elapsed().as_secs_f64());
        self.record(&job.repo.name, false, false);
        tracing::warn!(
            repo = %job.repo.name,
            target = %job.target,
            branch = %job.branch,
            duration = %format!("{:.1}s", started.elapsed().as_secs_f64()),
            reason = %reply.message.as_deref().unwrap_or("").lines().next().unwrap_or(""),
            "build failed"
        );
        self.publish_final(&self.subscribers(), &reply, cancel).await;
    }

    /// Roots `out` as the host's newest generation (adopting the link of an earlier good build
    /// when there is no record yet), drops generations beyond `keep_generations`, and works out
    /// what changed against the previous one; returns the generations kept and the changes.
    /// Problems are logged: the build itself succeeded.
    async fn record_generation(
        &self,
        repo: &str,
        host: &str,
        out: &str,
        previous_link: Option<&str>,
        commit: Option<&str>,
    ) -> (Vec<crate::fleet::Generation>, Option<Changes>) {
        if self.generations.list(repo, host).is_empty()
            && let Some(prev) = previous_link.filter(|p| *p != out)
        {
            // Built before generations were kept: the old out-link is generation 1.
            self.root_generation(repo, host, prev, None, now_seconds() - 1).await;
        }
        // The same system again: no new generation, and what changed stays what the newest
        // changed against the one before it (never "no change" against itself).
        let existing = self.generations.list(repo, host);
        if existing.last().is_some_and(|g| g.path == out) {
            let kept = self.fleet.snapshot().get(&(repo.to_owned(), host.to_owned())).and_then(|h| h.changes.clone());
            return (existing, kept);
        }
        // Compared with the newest good system before this build, which is another one.
        let before = existing.last().map(|g| g.path.clone());
        self.root_generation(repo, host, out, commit, now_seconds()).await;
        let gens = self.generations.list(repo, host);
        let Some(after) = self.closure(out).await else { return (gens, None) };
        // The host is about to pull its closure: have it compressed once, in the background.
        self.store.cache_nars(&after);
        (gens, self.describe(repo, host, before.as_deref(), &after).await)
    }

    /// The closure of the store path `path`, from the store's path info.
    async fn closure(&self, path: &str) -> Option<Vec<Arc<crate::store::PathInfo>>> {
        let path = StorePath::from_absolute(self.store.store_dir(), path)?;
        self.store.closure(&path).await.ok()?
    }

    async fn root_generation(&self, repo: &str, host: &str, path: &str, commit: Option<&str>, at: i64) {
        let Some(plan) = self.generations.plan(repo, host, path, commit, at) else { return };
        if let Err(e) = self.exec.add_root(path, &plan.link, &CancellationToken::new()).await {
            tracing::warn!(%repo, %host, err = %e.detail(), "cannot root a generation; older ones are kept");
            return;
        }
        for old in plan.obsolete {
            if let Err(e) = std::fs::remove_file(&old) {
                tracing::warn!(link = %old.display(), err = %e, "cannot drop an old generation");
            }
        }
    }

    /// The newest generation's changes against the one before it (the store path `before`),
    /// from the store's path info; its closure's size goes to the metrics.
    async fn describe(
        &self,
        repo: &str,
        host: &str,
        before: Option<&str>,
        after: &[Arc<crate::store::PathInfo>],
    ) -> Option<Changes> {
        let changes = self.diff(before, after).await?;
        let label = RepoHost { repo: repo.to_owned(), host: host.to_owned() };
        self.metrics
            .host_closure_bytes
            .get_or_create(&label)
            .set(i64::try_from(changes.bytes_after).unwrap_or(i64::MAX));
        self.metrics.host_closure_paths.get_or_create(&label).set(changes.paths_after as i64);
        Some(changes)
    }

    /// What `after` (a closure) changes against the system `before`.
    async fn diff(&self, before: Option<&str>, after: &[Arc<crate::store::PathInfo>]) -> Option<Changes> {
        let sizes = |infos: &[Arc<crate::store::PathInfo>]| {
            infos.iter().map(|i| (i.path.to_string(), i.nar_size)).collect::<Vec<_>>()
        };
        let after = sizes(after);
        let changes = match before {
            Some(before) => closure_diff::diff(&sizes(&self.closure(before).await?), &after),
            None => {
                let mut c = closure_diff::diff(&[], &[]);
                c.first_build = true;
                c.paths_after = after.len();
                c.bytes_after = after.iter().map(|(_, s)| s).sum();
                c
            }
        };
        Some(changes)
    }

    /// At startup: the generations on disk are the record; closure sizes and changes are worked
    /// out again from the store.
    async fn recover(self: Arc<Self>) {
        let repos: Vec<String> = self.config.repos.iter().map(|r| r.name.clone()).collect();
        // A build that ended after hearth was killed was never reported: it is no generation.
        for link in self.generations.unrecorded_links(&repos) {
            match std::fs::remove_file(&link) {
                Ok(()) => {
                    tracing::warn!(root = %link.display(), "removed a GC root of a build that was never reported")
                }
                Err(e) => {
                    tracing::warn!(root = %link.display(), err = %e, "cannot remove an unreported build's GC root")
                }
            }
        }
        for (repo, host) in self.generations.hosts(&repos) {
            let gens = self.generations.list(&repo, &host);
            let changes = match gens.last() {
                Some(newest) => {
                    let before = gens.len().checked_sub(2).and_then(|i| gens.get(i)).map(|g| g.path.as_str());
                    match self.closure(&newest.path).await {
                        Some(after) => self.describe(&repo, &host, before, &after).await,
                        None => None,
                    }
                }
                None => None,
            };
            self.fleet.update(&repo, &host, |h| {
                h.generations = gens;
                if let Some(c) = &changes {
                    h.set_changes(c);
                }
            });
        }
    }

    /// Counts a finished build; `any_host_ok`: a host of the deploy branch built (a repo with one
    /// broken host still builds the others, and HearthHostBroken names the broken one).
    fn record(&self, repo: &str, ok: bool, any_host_ok: bool) {
        let status = if ok { "success" } else { "failure" };
        self.metrics.builds.get_or_create(&RepoStatus { repo: repo.to_owned(), status: status.into() }).inc();
        let label = Repo { repo: repo.to_owned() };
        self.metrics.build_last.get_or_create(&label).set(now_seconds());
        if any_host_ok {
            self.metrics.build_last_success.get_or_create(&label).set(now_seconds());
        }
    }

    /// Makes every host's series exist (at 0) so that its first failure shows as an increase.
    fn seed_host_series(&self, repo: &str, host: &str) {
        for status in ["success", "failure"] {
            let labels = RepoHostStatus { repo: repo.to_owned(), host: host.to_owned(), status: status.into() };
            let _ = self.metrics.build_hosts.get_or_create(&labels);
        }
    }

    /// Builds one host, forwarding log lines as rate-limited `progress` replies.
    async fn build_with_progress(
        &self,
        flake: &str,
        job: &Job,
        host: &str,
        cancel: &CancellationToken,
    ) -> Result<String, BuildError> {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<String>(1024);
        let mut on_line = move |line: &str| {
            // A full channel drops lines: progress is a sample, the failure tail is kept apart.
            let _ = tx.try_send(line.to_owned());
        };
        let interval = self.config.progress_interval;
        let forward = async {
            let mut pending: Vec<String> = Vec::new();
            let mut last = Instant::now() - interval;
            loop {
                let wait = interval.saturating_sub(last.elapsed());
                let line = if pending.is_empty() {
                    rx.recv().await
                } else {
                    match tokio::time::timeout(wait, rx.recv()).await {
                        Ok(l) => l,
                        Err(_) => {
                            self.send_lines(job, host, &mut pending).await;
                            last = Instant::now();
                            continue;
                        }
                    }
                };
                let Some(line) = line else { break };
                pending.push(line);
                if pending.len() > 20 {
                    pending.remove(0);
                }
                if last.elapsed() >= interval {
                    self.send_lines(job, host, &mut pending).await;
                    last = Instant::now();
                }
            }
            if !pending.is_empty() {
                self.send_lines(job, host, &mut pending).await;
            }
        };
        let other_branch = (job.branch != job.repo.branch).then_some(job.branch.as_str());
        let link = self.generations.out_link(&job.repo.name, host, other_branch);
        let build = async {
            let r = self.exec.build_host(flake, host, &link, cancel, &mut on_line).await;
            drop(on_line);
            r
        };
        let (result, ()) = tokio::join!(build, forward);
        result
    }

    async fn send_lines(&self, job: &Job, host: &str, lines: &mut Vec<String>) {
        let mut r = Reply::new(Status::Progress, &job.repo.name, &job.target);
        r.host = Some(host.to_owned());
        r.message = Some(lines.join("\n"));
        lines.clear();
        self.publish(&self.subscribers(), &r).await;
    }

    async fn publish(&self, to: &[String], reply: &Reply) {
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
        metrics.host_last_success.get_or_create(&RepoHost { repo: repo.clone(), host }).set(i64::from(ok));
        let label = Repo { repo };
        let at = metrics.build_last.get_or_create(&label).get().max(last.at);
        metrics.build_last.get_or_create(&label).set(at);
        if ok {
            let at = metrics.build_last_success.get_or_create(&label).get().max(last.at);
            metrics.build_last_success.get_or_create(&label).set(at);
        }
    }
}
