//! What a host's result does to the record: its GC roots (the out-link and the generations),
//! its closure and what changed, the fleet record, and its metrics. The worker hands each
//! host's outcome here once; at startup this room reads the record back from the roots.
//!
//! Architecture invariant: only the deploy branch's results are a host's state (generations,
//! `last_build`, per-host metrics); another branch's are recorded apart, under its branch.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use tokio_util::sync::CancellationToken;

use super::exec::Exec;
use super::generations::{self, Generations};
use super::job::{HostStatus, HostSummary};
use super::plan::Plan;
use crate::fleet::{
    BranchBuild, BranchOrder, BucketCopy, BuildResult, Fleet, Generation, LastBuild, NewSystem, Placed, Pushed,
};
use crate::metrics::{Metrics, RepoHost, RepoHostStatus};
use crate::nix::closure_diff::{self, Changes};
use crate::nix::store_path::StorePath;
use crate::store::{PathInfo, Store};

pub fn now_seconds() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

/// How one host's part of a build ended.
#[derive(Debug)]
pub enum Outcome {
    /// Its system `out` is built (and valid in the store).
    Built { out: String },
    /// Its system `out` is already its newest good generation.
    Unchanged { out: String },
    /// Evaluation or a derivation it needs failed: the error, with a log tail.
    Failed { error: String },
}

/// The request a host's outcome belongs to.
pub struct Context<'a> {
    pub repo: &'a str,
    /// The repo's flake URL (a `git+` one orders commits by the branch's history).
    pub url: &'a str,
    pub branch: &'a str,
    /// The branch is the repo's deploy branch: the result is the host's state.
    pub deploy: bool,
    pub commit: Option<&'a str>,
    /// Where the commit stands in the deploy branch's history: read once per request, at its
    /// first record (see [`Recorder::branch_order`]).
    pub order: tokio::sync::OnceCell<Option<Arc<BranchOrder>>>,
}

/// How long a final reply waits for the shared record to take the build's result.
const RECORDED_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Writes results into the record.
pub struct Recorder {
    pub store: Arc<Store>,
    pub metrics: Arc<Metrics>,
    pub fleet: Arc<Fleet>,
    pub generations: Generations,
    pub exec: Exec,
    /// This builder's name, on the generations it roots.
    pub name: String,
    pub keep_generations: usize,
    /// Pushes each good system's closure to the bucket, with its HEAD concurrency.
    pub uploader: Option<(Arc<crate::bucket::upload::Uploader>, usize)>,
}

/// A host's generations as the record shows them: this builder's own (from its roots, named
/// with it) and, where several builders share the record, the others' newest (as they recorded
/// them), one entry per system, oldest first, at most `keep`.
fn merge(shared: &[Generation], local: Vec<Generation>, me: &str, keep: usize) -> Vec<Generation> {
    let mut all: Vec<Generation> = local
        .into_iter()
        .map(|mut g| {
            g.builder = Some(me.to_owned());
            g
        })
        .collect();
    for g in shared.iter().filter(|g| g.builder.as_deref().is_some_and(|b| b != me)) {
        if !all.iter().any(|a| a.path == g.path) {
            all.push(g.clone());
        }
    }
    all.sort_by_key(|g| (g.built_at, g.number));
    let from = all.len().saturating_sub(keep.max(1));
    all.split_off(from)
}

impl Recorder {
    /// Whether `out` is `host`'s newest good generation and still in the store.
    pub async fn is_newest(&self, repo: &str, host: &str, out: &str) -> bool {
        let record = self.fleet.host(repo, host);
        let newest = record.and_then(|r| r.generations.last().map(|g| g.path.clone()));
        newest.as_deref() == Some(out) && self.is_valid(out).await
    }

    /// Whether the store holds the path `path`.
    pub async fn is_valid(&self, path: &str) -> bool {
        match StorePath::from_absolute(self.store.store_dir(), path) {
            Some(p) => matches!(self.store.path_info(p.hash()).await, Ok(Some(_))),
            None => false,
        }
    }

    /// Before a build of `plan`: the host series exist (deploy branch), hosts the deploy
    /// branch's newest commit no longer defines leave the record and the gauges (their roots
    /// stay, as keep_generations says; `whole_branch`: the build is of every host at the
    /// branch's head, so a pinned, maybe older, commit never drops a host: the bucket's gc keeps
    /// only what the record names), and another branch's old roots are pruned.
    pub fn prepare(&self, repo: &str, plan: &Plan, whole_branch: bool) {
        if !plan.deploy {
            let age = std::time::Duration::from_secs(generations::BRANCH_ROOT_DAYS * 86_400);
            self.generations.prune_branch_roots(&[repo.to_owned()], age);
            return;
        }
        if whole_branch {
            for ((r, host), _) in self.fleet.snapshot() {
                if r == repo && !plan.hosts.contains(&host) {
                    self.metrics.host_last_success.remove(&label(&r, &host));
                }
            }
            self.fleet.retain(repo, |host| plan.hosts.iter().any(|h| h == host));
        }
        for host in &plan.hosts {
            self.seed_host_series(repo, host);
        }
    }

    /// Records one host's outcome: roots its system, counts it, works out what changed, writes
    /// the fleet record, logs it and pushes a good system to the bucket. Returns its summary
    /// for the final reply.
    pub async fn record(&self, cx: &Context<'_>, host: &str, outcome: Outcome, duration: f64) -> HostSummary {
        let result = self.root_result(cx, host, outcome).await;
        self.count(cx, host, result.status, duration);
        // The system's closure, read once: for what changed, and for the bucket.
        let closure = match &result.out_path {
            Some(out) => self.closure(out).await,
            None => None,
        };
        let (system, changes) = self.changes(cx, host, &result, closure.as_deref()).await;
        let order = self.branch_order(cx).await;
        let placed = self.write(cx, host, &result, system, order);
        let out = result.out_path.as_deref().unwrap_or("-");
        let duration_text = format!("{duration:.1}s");
        let (repo, branch) = (cx.repo, cx.branch);
        match &result.error {
            None => {
                let unchanged = result.status == HostStatus::Unchanged;
                tracing::info!(%repo, %host, %branch, %out, unchanged, duration = %duration_text, "host built")
            }
            Some(e) => {
                let error = e.lines().next().unwrap_or("");
                tracing::warn!(%repo, %host, %branch, duration = %duration_text, %error, "host failed to build")
            }
        }
        // A superseded system is kept, not pushed: the bucket keeps what the record names.
        let uploaded = match placed {
            Placed::Current => self.push(cx, host, closure.as_deref(), result.out_path.as_deref()),
            Placed::Superseded => None,
        };
        let HostResult { status, out_path, error } = result;
        HostSummary { host: host.to_owned(), status, out_path, error, duration_seconds: duration, changes, uploaded }
    }

    /// The outcome as a result; a built system's out-link (the root of the newest result) is
    /// made first, so the system cannot be collected while it is recorded.
    async fn root_result(&self, cx: &Context<'_>, host: &str, outcome: Outcome) -> HostResult {
        let out = match outcome {
            Outcome::Built { out } => out,
            Outcome::Unchanged { out } => {
                return HostResult { status: HostStatus::Unchanged, out_path: Some(out), error: None };
            }
            Outcome::Failed { error } => {
                return HostResult { status: HostStatus::Failure, out_path: None, error: Some(error) };
            }
        };
        let other = (!cx.deploy).then_some(cx.branch);
        let previous = self.generations.newest_link(cx.repo, host);
        let link = self.generations.out_link(cx.repo, host, other);
        if let Err(e) = self.root(&out, &link).await {
            let error = Some(format!("cannot root the system: {e}"));
            return HostResult { status: HostStatus::Failure, out_path: None, error };
        }
        if cx.deploy {
            self.adopt_unrecorded(cx.repo, host, &out, previous.as_deref()).await;
        }
        HostResult { status: HostStatus::Success, out_path: Some(out), error: None }
    }

    /// The host's metrics: its build time, and (deploy branch) its result.
    fn count(&self, cx: &Context<'_>, host: &str, status: HostStatus, duration: f64) {
        self.metrics.build_duration.get_or_create(&label(cx.repo, host)).observe(duration);
        if cx.deploy {
            let ok = status.is_ok();
            let result = if ok { BuildResult::Success } else { BuildResult::Failure };
            let series =
                RepoHostStatus { repo: cx.repo.to_owned(), host: host.to_owned(), status: result.as_str().into() };
            self.metrics.build_hosts.get_or_create(&series).inc();
            self.metrics.host_last_success.get_or_create(&label(cx.repo, host)).set(i64::from(ok));
        }
    }

    /// A new system of the deploy branch (to place in the host's history) and what the result
    /// changes.
    async fn changes(
        &self,
        cx: &Context<'_>,
        host: &str,
        result: &HostResult,
        closure: Option<&[Arc<PathInfo>]>,
    ) -> (Option<NewSystem>, Option<Changes>) {
        let Some(out) = &result.out_path else { return (None, None) };
        match result.status {
            HostStatus::Success if cx.deploy => {
                let system = self.record_generation(cx.repo, host, out, closure, cx.commit).await;
                let changes = system.changes.clone();
                (Some(system), changes)
            }
            // Nothing built: nothing changed.
            HostStatus::Unchanged => (None, closure.map(unchanged)),
            // Another branch: what it would change against the host's newest deploy system,
            // for the reply (flake-update's commit message) only.
            _ => {
                let newest = self.newest_recorded(cx.repo, host);
                match closure {
                    Some(after) => (None, self.diff(newest.as_deref(), after).await),
                    None => (None, None),
                }
            }
        }
    }

    /// The host's newest good system as the record says (whichever builder built it), else
    /// as this builder's roots say.
    fn newest_recorded(&self, repo: &str, host: &str) -> Option<String> {
        let record = self.fleet.host(repo, host);
        record
            .and_then(|r| r.generations.last().map(|g| g.path.clone()))
            .or_else(|| self.generations.list(repo, host).last().map(|g| g.path.clone()))
    }

    /// Where the recorded commit stands in the deploy branch's history, read at the request's
    /// first record and shared by the others (a commit pushed since is unknown to it, and
    /// ordered by when it was recorded: see [`BranchOrder`]). It decides whether a result is
    /// the host's state, in every write the writer tries. `None` off the deploy branch, for a
    /// flake without git history, or when the branch cannot be read (then the result is the
    /// state).
    async fn branch_order(&self, cx: &Context<'_>) -> Option<Arc<BranchOrder>> {
        let commit = cx.commit.filter(|_| cx.deploy)?;
        let read = async {
            match self.exec.branch_order(cx.url, cx.branch, commit, &CancellationToken::new()).await {
                Ok(order) => order.map(Arc::new),
                Err(e) => {
                    let (repo, err) = (cx.repo, e.detail());
                    tracing::warn!(%repo, %commit, %err, "cannot read the branch's history; recording this build as the newest");
                    None
                }
            }
        };
        cx.order.get_or_init(|| read).await.clone()
    }

    /// One update (and one save) of the fleet record for the host's result; where it went in
    /// the host's history.
    fn write(
        &self,
        cx: &Context<'_>,
        host: &str,
        result: &HostResult,
        system: Option<NewSystem>,
        order: Option<Arc<BranchOrder>>,
    ) -> Placed {
        let at = now_seconds();
        let build = match &result.error {
            Some(e) => LastBuild::failed(at, cx.commit.map(str::to_owned), e),
            None => LastBuild::new(BuildResult::Success, at, cx.commit.map(str::to_owned)),
        };
        let (deploy, branch, keep) = (cx.deploy, cx.branch.to_owned(), self.keep_generations);
        let out_path = result.out_path.clone();
        // Where it goes, as the record stands now (the writer applies the same rule again if
        // another builder wrote the host meanwhile).
        let mut now = self.fleet.host(cx.repo, host).unwrap_or_default();
        let placed = if deploy { now.place(&build, system.as_ref(), order.as_deref(), keep) } else { Placed::Current };
        if placed == Placed::Superseded {
            let (repo, commit) = (cx.repo, cx.commit.unwrap_or("-"));
            tracing::warn!(%repo, %host, %commit, "a newer commit of the branch is recorded already: this build is kept apart, not the host's state");
        }
        self.fleet.update(cx.repo, host, move |h| {
            if !deploy {
                h.branches.insert(branch.clone(), BranchBuild { build: build.clone(), out_path: out_path.clone() });
                h.branches.retain(|_, b| at - b.build.at < generations::BRANCH_ROOT_DAYS as i64 * 86_400);
                return;
            }
            h.place(&build, system.as_ref(), order.as_deref(), keep);
        });
        placed
    }

    /// A good system of the deploy branch goes to the bucket, if there is one: where its push
    /// stands now.
    fn push(
        &self,
        cx: &Context<'_>,
        host: &str,
        closure: Option<&[Arc<PathInfo>]>,
        out: Option<&str>,
    ) -> Option<Pushed> {
        let (Some((uploader, concurrency)), Some(closure), Some(out), true) = (&self.uploader, closure, out, cx.deploy)
        else {
            return None;
        };
        // Checked only once the record names the system (it was just written): a gc that reads
        // the record after the checks keeps everything they find.
        let batch = uploader.push_after(closure, *concurrency, self.recorded_future());
        let pushed = batch.now();
        let repo = cx.repo;
        tracing::info!(%repo, %host, in_bucket = pushed.present, of = pushed.total, queued = pushed.queued, "pushing the system to the bucket");
        self.follow_push(repo, host, out, batch);
        Some(pushed)
    }

    /// Records where the push of the host's system `out` stands, now and again when its
    /// uploads have ended, in the fleet record (so every builder's page shows it); a newer
    /// system of the host replaces it.
    fn follow_push(&self, repo: &str, host: &str, out: &str, batch: Arc<crate::bucket::upload::Batch>) {
        let now = batch.now();
        record_push(&self.fleet, repo, host, out, now);
        if now.queued == 0 {
            return;
        }
        let (fleet, repo, host, out) = (self.fleet.clone(), repo.to_owned(), host.to_owned(), out.to_owned());
        tokio::spawn(async move {
            let end = batch.finished().await;
            tracing::info!(%repo, %host, in_bucket = end.present, of = end.total, failed = end.failed, "pushed the system to the bucket");
            record_push(&fleet, &repo, &host, &out, end);
        });
    }

    /// Makes `link` an indirect GC root of the store path `path`: through the daemon
    /// (`AddIndirectRoot`, no process), else through `nix build --out-link`. The path is held by
    /// a temporary root meanwhile, and must still be in the store.
    async fn root(&self, path: &str, link: &std::path::Path) -> Result<(), String> {
        let store_path = StorePath::from_absolute(self.store.store_dir(), path).ok_or("not a store path")?;
        let held = self.store.hold(&store_path).await.map_err(|e| e.to_string())?;
        if held.is_none() {
            return Err(format!("{path} is not in the store"));
        }
        match self.store.add_indirect_root(&store_path, link).await {
            Ok(()) => Ok(()),
            Err(e) => {
                tracing::debug!(err = %e, "the daemon did not add the root; asking nix");
                self.exec.add_root(path, link, &CancellationToken::new()).await.map_err(|e| e.detail())
            }
        }
    }

    /// A host built before generations were kept: its old out-link becomes generation 1.
    async fn adopt_unrecorded(&self, repo: &str, host: &str, out: &str, previous_link: Option<&str>) {
        if self.generations.list(repo, host).is_empty()
            && let Some(prev) = previous_link.filter(|p| *p != out)
        {
            self.root_generation(repo, host, prev, None, now_seconds() - 1).await;
        }
    }

    /// Roots `out` as this builder's newest generation (dropping its roots beyond
    /// `keep_generations`), and works out what changed against the host's newest system (the
    /// record's, whichever builder built it). Problems are logged: the build itself succeeded.
    async fn record_generation(
        &self,
        repo: &str,
        host: &str,
        out: &str,
        after: Option<&[Arc<PathInfo>]>,
        commit: Option<&str>,
    ) -> NewSystem {
        let before = self.newest_recorded(repo, host);
        let mut system = NewSystem {
            path: out.to_owned(),
            built_at: now_seconds(),
            commit: commit.map(str::to_owned),
            builder: Some(self.name.clone()),
            before: before.clone(),
            changes: None,
        };
        if self.generations.list(repo, host).last().is_none_or(|g| g.path != out) {
            self.root_generation(repo, host, out, commit, system.built_at).await;
        }
        // The same system again: what changed stays what it changed against the one before
        // it (never "no change" against itself).
        if before.as_deref() == Some(out) {
            let kept = self.fleet.host(repo, host).and_then(|h| h.changes);
            system.changes = kept;
            return system;
        }
        let Some(after) = after else { return system };
        // The host is about to pull its closure: have it compressed once, in the background.
        self.store.cache_nars(after);
        system.changes = self.describe(repo, host, before.as_deref(), after).await;
        system
    }

    /// The closure of the system `path` with each path's NAR size: from the store, else (a
    /// system another builder built) from the bucket's narinfos.
    async fn closure_sizes(&self, path: &str) -> Option<Vec<(String, u64)>> {
        if let Some(infos) = self.closure(path).await {
            return Some(infos.iter().map(|i| (i.path.to_string(), i.nar_size)).collect());
        }
        let (uploader, _) = self.uploader.as_ref()?;
        match uploader.bucket().closure_sizes(self.store.store_dir(), path).await {
            Ok(found) => found,
            Err(e) => {
                tracing::warn!(system = %path, err = %e, "cannot read the previous system's closure from the bucket");
                None
            }
        }
    }

    /// The closure of the store path `path`, from the store's path info.
    async fn closure(&self, path: &str) -> Option<Vec<Arc<PathInfo>>> {
        let path = StorePath::from_absolute(self.store.store_dir(), path)?;
        self.store.closure(&path).await.ok()?
    }

    async fn root_generation(&self, repo: &str, host: &str, path: &str, commit: Option<&str>, at: i64) {
        let Some(plan) = self.generations.plan(repo, host, path, commit, at) else { return };
        if let Err(e) = self.root(path, &plan.link).await {
            tracing::warn!(%repo, %host, err = %e, "cannot root a generation; older ones are kept");
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
    async fn describe(&self, repo: &str, host: &str, before: Option<&str>, after: &[Arc<PathInfo>]) -> Option<Changes> {
        let changes = self.diff(before, after).await?;
        let label = label(repo, host);
        self.metrics
            .host_closure_bytes
            .get_or_create(&label)
            .set(i64::try_from(changes.bytes_after).unwrap_or(i64::MAX));
        self.metrics.host_closure_paths.get_or_create(&label).set(changes.paths_after as i64);
        Some(changes)
    }

    /// What `after` (a closure) changes against the system `before`.
    async fn diff(&self, before: Option<&str>, after: &[Arc<PathInfo>]) -> Option<Changes> {
        let sizes =
            |infos: &[Arc<PathInfo>]| infos.iter().map(|i| (i.path.to_string(), i.nar_size)).collect::<Vec<_>>();
        let after = sizes(after);
        let changes = match before {
            Some(before) => closure_diff::diff(&self.closure_sizes(before).await?, &after),
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
    pub async fn recover(&self, repos: &[String]) {
        // A build that ended after hearth was killed was never reported: it is no generation.
        for link in self.generations.unrecorded_links(repos) {
            match std::fs::remove_file(&link) {
                Ok(()) => {
                    tracing::warn!(root = %link.display(), "removed a GC root of a build that was never reported")
                }
                Err(e) => {
                    tracing::warn!(root = %link.display(), err = %e, "cannot remove an unreported build's GC root")
                }
            }
        }
        for (repo, host) in self.generations.hosts(repos) {
            let gens = self.generations.list(&repo, &host);
            let newest = gens.last().map(|g| g.path.clone());
            let closure = match &newest {
                Some(path) => self.closure(path).await,
                None => None,
            };
            let changes = match &closure {
                Some(after) => {
                    let before = gens.len().checked_sub(2).and_then(|i| gens.get(i)).map(|g| g.path.as_str());
                    self.describe(&repo, &host, before, after).await
                }
                None => None,
            };
            let (me, keep, shared) = (self.name.clone(), self.keep_generations, self.fleet.is_shared());
            self.fleet.update(&repo, &host, move |h| {
                // A shared record is the host's one history: this builder's roots fill it
                // only where it has none (a builder that kept its record alone until now).
                if shared && !h.generations.is_empty() {
                    return;
                }
                h.generations = merge(&h.generations, gens.clone(), &me, keep);
                if let Some(c) = &changes {
                    h.set_changes(c);
                }
            });
            // An upload cut short by a stop goes on: what the bucket lacks is queued, checked
            // once the record (just written) names the system; only the host's newest system
            // (another builder's newer one is that builder's to push).
            let fleet_newest = self.newest_recorded(&repo, &host);
            if let (Some((uploader, concurrency)), Some(after), Some(newest)) = (&self.uploader, &closure, &newest)
                && fleet_newest.as_ref() == Some(newest)
            {
                let batch = uploader.push_after(after, *concurrency, self.recorded_future());
                self.follow_push(&repo, &host, newest, batch);
            }
        }
    }

    /// Returns once the record where it is kept (the shared record included) holds every
    /// result written so far, or after [`RECORDED_WAIT`]: a final reply follows its record, so
    /// a client told "completed" finds the result on every builder's page.
    pub async fn settled(&self) {
        if !self.written_within(RECORDED_WAIT).await {
            tracing::warn!(
                seconds = RECORDED_WAIT.as_secs(),
                "the shared record has not taken this build's result yet; replying anyway (it is written when NATS answers)"
            );
        }
    }

    /// Resolves once the record holds every change made so far (60 s at most).
    fn recorded_future(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let recorded = self.written_within(std::time::Duration::from_secs(60));
        async move {
            recorded.await;
        }
    }

    /// Resolves once the record holds every change made until now (true), or after `wait`
    /// (false).
    fn written_within(&self, wait: std::time::Duration) -> impl std::future::Future<Output = bool> + Send + 'static {
        let fleet = self.fleet.clone();
        let target = fleet.changes_sent();
        async move { tokio::time::timeout(wait, fleet.flushed_to(target)).await.is_ok() }
    }

    /// The plan's result as the record holds it, if every host of it was recorded at the plan's
    /// commit (a request delivered again after its build ended is answered from this, never
    /// built again).
    pub fn recorded(&self, repo: &str, plan: &Plan) -> Option<Vec<HostSummary>> {
        let commit = plan.commit.as_deref()?;
        from_record(&self.fleet.snapshot(), repo, &plan.hosts, commit)
    }

    /// The plan's result from the record if every host of it was built at the plan's commit
    /// within the last `within` seconds (by any builder).
    pub fn recorded_within(&self, repo: &str, plan: &Plan, within: u64) -> Option<Vec<HostSummary>> {
        let commit = plan.commit.as_deref()?;
        let record = self.fleet.snapshot();
        let since = now_seconds() - i64::try_from(within).unwrap_or(i64::MAX);
        let recent = plan.hosts.iter().all(|host| {
            let last = record.get(&(repo.to_owned(), host.clone())).and_then(|h| h.last_build.as_ref());
            last.is_some_and(|b| b.at >= since)
        });
        if recent { from_record(&record, repo, &plan.hosts, commit) } else { None }
    }

    /// Makes every host's series exist (at 0) so that its first failure shows as an increase.
    pub fn seed_host_series(&self, repo: &str, host: &str) {
        self.metrics.seed_host_series(repo, host);
    }
}

/// Each of `hosts`' results at `commit` as `record` holds them; `None` if one has none.
fn from_record(record: &crate::fleet::Hosts, repo: &str, hosts: &[String], commit: &str) -> Option<Vec<HostSummary>> {
    hosts
        .iter()
        .map(|host| {
            let h = record.get(&(repo.to_owned(), host.clone()))?;
            let last = h.last_build.as_ref().filter(|b| b.commit.as_deref() == Some(commit))?;
            let (status, out_path) = if last.status.is_success() {
                (HostStatus::Success, Some(h.generations.last()?.path.clone()))
            } else {
                (HostStatus::Failure, None)
            };
            Some(HostSummary {
                host: host.clone(),
                status,
                out_path,
                error: last.error.clone(),
                duration_seconds: 0.0,
                changes: h.changes.clone(),
                uploaded: None,
            })
        })
        .collect()
}

/// A host's result as the record keeps it.
struct HostResult {
    status: HostStatus,
    out_path: Option<String>,
    error: Option<String>,
}

/// An unchanged system's changes: none, against its own closure.
fn unchanged(after: &[Arc<PathInfo>]) -> Changes {
    let sizes: Vec<(String, u64)> = after.iter().map(|i| (i.path.to_string(), i.nar_size)).collect();
    closure_diff::diff(&sizes, &sizes)
}

fn label(repo: &str, host: &str) -> RepoHost {
    RepoHost { repo: repo.to_owned(), host: host.to_owned() }
}

/// The push of `out` as it stands, on the host's record, while `out` is its newest system. What
/// the bucket holds of the newest system only grows (gc keeps every path of it): a push that
/// finds less, or fails (a builder with a wrong secret, an unreachable bucket), says so in its
/// builder's log and metrics, never in the record over what another push found there.
fn record_push(fleet: &Fleet, repo: &str, host: &str, out: &str, pushed: Pushed) {
    let out = out.to_owned();
    fleet.update(repo, host, move |h| {
        let newest = h.generations.last().is_some_and(|g| g.path == out);
        let knows_more = h.bucket.is_some_and(|b| b.pushed.present > pushed.present);
        if newest && !knows_more {
            let at = now_seconds();
            h.bucket = Some(BucketCopy { pushed, at });
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plan_is_answered_from_the_record_only_if_every_host_is_recorded_at_its_commit() {
        let mut record = crate::fleet::Hosts::new();
        let generation = |path: &str| Generation {
            number: 1,
            path: path.into(),
            built_at: 0,
            commit: Some("c1".into()),
            builder: None,
        };
        let web1 = crate::fleet::HostRecord {
            last_build: Some(LastBuild::new(BuildResult::Success, 5, Some("c1".into()))),
            generations: vec![generation("/nix/store/a-web1")],
            ..Default::default()
        };
        let db1 = crate::fleet::HostRecord {
            last_build: Some(LastBuild::failed(6, Some("c1".into()), "boom")),
            ..Default::default()
        };
        record.insert(("fleet".into(), "web1".into()), web1);
        record.insert(("fleet".into(), "db1".into()), db1);
        let hosts = vec!["web1".to_owned(), "db1".to_owned()];
        let answered = from_record(&record, "fleet", &hosts, "c1").unwrap();
        assert_eq!(answered[0].status, HostStatus::Success);
        assert_eq!(answered[0].out_path.as_deref(), Some("/nix/store/a-web1"));
        assert_eq!((answered[1].status, answered[1].error.as_deref()), (HostStatus::Failure, Some("boom")));
        // Another commit, or a host not recorded: built, not answered.
        assert!(from_record(&record, "fleet", &hosts, "c2").is_none());
        assert!(from_record(&record, "fleet", &["web2".to_owned()], "c1").is_none());
    }

    fn generation(n: u64, path: &str, at: i64, builder: Option<&str>) -> Generation {
        Generation { number: n, path: path.into(), built_at: at, commit: None, builder: builder.map(str::to_owned) }
    }

    #[test]
    fn generations_of_several_builders_merge_newest_last() {
        let shared = [
            generation(1, "/nix/store/a", 10, Some("b1")),
            generation(7, "/nix/store/x", 20, Some("b2")),
            generation(2, "/nix/store/b", 30, Some("b1")),
        ];
        let local = vec![
            generation(1, "/nix/store/a", 10, None),
            generation(2, "/nix/store/b", 30, None),
            generation(3, "/nix/store/c", 40, None),
        ];
        let merged = merge(&shared, local, "b1", 3);
        let paths: Vec<&str> = merged.iter().map(|g| g.path.as_str()).collect();
        assert_eq!(paths, ["/nix/store/x", "/nix/store/b", "/nix/store/c"]);
        assert_eq!(merged[0].builder.as_deref(), Some("b2"));
        assert_eq!(merged[2].builder.as_deref(), Some("b1"));
        // One builder: its own roots are the record.
        let alone = merge(&[], vec![generation(1, "/nix/store/a", 10, None)], "b1", 3);
        assert_eq!(alone.len(), 1);
    }
}
