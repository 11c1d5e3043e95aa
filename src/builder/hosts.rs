//! A planned request's hosts, built: each host's system evaluated on every core (the unchanged
//! ones reported at once), one build graph for the rest, and each host recorded as it ends:
//! early while the graph runs, or after it, in the plan's order.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use super::Worker;
use super::error::BuildError;
use super::eval::{self, Evaluated};
use super::graph::{self, Board};
use super::job::{HostSummary, Kind, Phase};
use super::plan::Plan;
use super::queue::Job;
use super::record::{self, Outcome};
use super::reply::{Heading, Throttle};

impl Worker {
    /// Builds the plan's hosts: evaluates them on up to `eval_workers` cores, reports the
    /// unchanged ones at once, realises the others in one build graph, and records each host's
    /// outcome. Returns the summaries in the plan's order, and whether shutdown cut the build.
    pub(super) async fn build_hosts(
        &self,
        plan: &Plan,
        job: &Job,
        heading: &Heading,
        cancel: &CancellationToken,
    ) -> (Vec<HostSummary>, bool) {
        let started = Instant::now();
        let mut board = Board::new(&plan.hosts);
        let mut eval = self.evaluate(plan, &mut board, heading, started, cancel).await;
        let cx = record::Context {
            repo: &job.repo.name,
            url: &job.repo.url,
            branch: &job.branch,
            deploy: plan.deploy,
            commit: plan.commit.as_deref(),
            order: Default::default(),
        };
        let (built, early) = if eval.shutdown || eval.evaluated.is_empty() {
            (Built::default(), HashMap::new())
        } else {
            let (done_tx, done_rx) = tokio::sync::mpsc::unbounded_channel();
            let graph = self.build_graph(&eval.evaluated, &board, heading, done_tx, cancel);
            let early = self.record_early(&cx, &eval.evaluated, done_rx, heading, started);
            tokio::join!(graph, early)
        };
        let shutdown = eval.shutdown || built.shutdown;
        for (host, e, eval_took) in eval.evaluated {
            if early.contains_key(&host) {
                continue;
            }
            let took = built.finished.at(&host).map_or(started.elapsed(), |t| t - started).as_secs_f64();
            let outcome = if self.recorder.is_valid(&e.out).await {
                Outcome::Built { out: e.out }
            } else if shutdown {
                continue;
            } else {
                let why = graph::why_failed(&self.exec, &host, &built.tracker, built.error.as_ref(), cancel).await;
                Outcome::Failed { error: why }
            };
            eval.outcomes.insert(host, (outcome, took.max(eval_took)));
        }
        let summaries = self.record_hosts(&cx, &plan.hosts, eval.outcomes, early, heading, started).await;
        (summaries, shutdown)
    }

    /// Records each host whose system the graph has built while the rest of it runs (a host
    /// is not held up by another's never-ending derivation): its record, roots, push and its
    /// `host_done` reply. A host counts as built when its system is in the store: looked at
    /// when its progress says it is done, and every [`EARLY_CHECK`] (Nix may end a build's log
    /// activity only when the whole graph ends). Returns their summaries, once `done` closes
    /// (the graph ended).
    async fn record_early(
        &self,
        cx: &record::Context<'_>,
        evaluated: &[(String, Evaluated, f64)],
        mut done: tokio::sync::mpsc::UnboundedReceiver<String>,
        heading: &Heading,
        started: Instant,
    ) -> HashMap<String, HostSummary> {
        let mut recorded = HashMap::new();
        loop {
            let hint = tokio::select! {
                hint = done.recv() => match hint {
                    Some(host) => Some(host),
                    None => return recorded,
                },
                () = tokio::time::sleep(EARLY_CHECK) => None,
            };
            let waiting: Vec<&(String, Evaluated, f64)> = evaluated
                .iter()
                .filter(|(h, _, _)| !recorded.contains_key(h) && hint.as_ref().is_none_or(|x| x == h))
                .collect();
            for (host, e, eval_took) in waiting {
                if !self.recorder.is_valid(&e.out).await {
                    continue;
                }
                let took = started.elapsed().as_secs_f64().max(*eval_took);
                let summary = self.record_one(cx, host, Outcome::Built { out: e.out.clone() }, took, heading).await;
                recorded.insert(host.clone(), summary);
            }
        }
    }

    /// Evaluates every host, on up to `eval_workers` cores, sending progress as it goes: a host
    /// whose system is already its newest is unchanged at once; a failed one has its outcome.
    async fn evaluate(
        &self,
        plan: &Plan,
        board: &mut Board,
        heading: &Heading,
        started: Instant,
        cancel: &CancellationToken,
    ) -> Evaluation {
        let mut eval = Evaluation::default();
        let mut throttle = Throttle::new(self.config.progress_interval);
        let workers = self.config.eval_workers;
        let mut results = eval::evaluate_all(&self.exec, &plan.flake, &plan.hosts, workers, cancel);
        while let Some((host, result)) = results.next().await {
            let took = started.elapsed().as_secs_f64();
            match result {
                Ok(e) if plan.deploy && self.recorder.is_newest(&heading.repo, host, &e.out).await => {
                    board.set(host, Phase::Unchanged, e.to_build.len());
                    eval.outcomes.insert(host.to_owned(), (Outcome::Unchanged { out: e.out }, took));
                }
                Ok(e) => {
                    board.set(host, Phase::Evaluated, e.to_build.len());
                    eval.evaluated.push((host.to_owned(), e, took));
                }
                // The others end as soon, each without a result.
                Err(BuildError::Shutdown) => eval.shutdown = true,
                Err(e) => {
                    board.set(host, Phase::Failed, 0);
                    tracing::warn!(repo = %heading.repo, %host, error = %e.to_string().lines().next().unwrap_or(""), "host failed to evaluate");
                    eval.outcomes.insert(host.to_owned(), (Outcome::Failed { error: e.detail() }, took));
                }
            }
            if throttle.due() {
                let done = board.evaluated();
                let mut r = heading
                    .progress(Kind::Evaluating)
                    .message(format!("evaluated {done} of {} host(s)", plan.hosts.len()));
                r.progress = Some(board.hosts());
                self.reporter.running(&r).await;
            }
        }
        eval
    }

    /// Realises every evaluated host in one build graph, with its progress; each host done
    /// goes to `done` as soon as it is.
    async fn build_graph(
        &self,
        evaluated: &[(String, Evaluated, f64)],
        board: &Board,
        heading: &Heading,
        done: tokio::sync::mpsc::UnboundedSender<String>,
        cancel: &CancellationToken,
    ) -> Built {
        let tracker = graph::Tracker::new(evaluated.iter().map(|(h, e, _)| (h.as_str(), e)));
        let mut r = match evaluated {
            [(only, _, _)] => {
                let mut r = heading.progress(Kind::Building).message(format!("building {only}"));
                r.host = Some(only.clone());
                r
            }
            many => heading.progress(Kind::Building).message(format!("building {} host(s)", many.len())),
        };
        r.progress = Some(board.merged(&tracker));
        self.reporter.running(&r).await;
        let drvs = graph::nodes(evaluated.iter().map(|(_, e, _)| e));
        let to = (&self.reporter, heading);
        let every = self.config.progress_interval;
        let (result, tracker, finished) =
            graph::realise_reporting(&self.exec, &drvs, tracker, board, to, every, done, cancel).await;
        let (shutdown, error) = match result {
            Ok(()) => (false, None),
            Err(BuildError::Shutdown) => (true, None),
            Err(e) => (false, Some(e)),
        };
        Built { tracker, finished, error, shutdown }
    }

    /// Each host's outcome into the record, in the plan's order, each host's result sent as
    /// it is recorded (those `early` were, while the graph ran); a host without an outcome was
    /// cut by shutdown.
    async fn record_hosts(
        &self,
        cx: &record::Context<'_>,
        hosts: &[String],
        mut outcomes: HashMap<String, (Outcome, f64)>,
        mut early: HashMap<String, HostSummary>,
        heading: &Heading,
        started: Instant,
    ) -> Vec<HostSummary> {
        let mut summaries = Vec::new();
        for host in hosts {
            if let Some(summary) = early.remove(host) {
                summaries.push(summary);
                continue;
            }
            let Some((outcome, took)) = outcomes.remove(host) else {
                // Not a result: the host's state, counters and record stay.
                summaries.push(HostSummary::interrupted(host, started.elapsed().as_secs_f64()));
                continue;
            };
            summaries.push(self.record_one(cx, host, outcome, took, heading).await);
        }
        summaries
    }

    /// Records one host's outcome and sends its `host_done` reply.
    async fn record_one(
        &self,
        cx: &record::Context<'_>,
        host: &str,
        outcome: Outcome,
        took: f64,
        heading: &Heading,
    ) -> HostSummary {
        let summary = self.recorder.record(cx, host, outcome, took).await;
        let mut r = heading.progress(Kind::HostDone).message(format!("{host}: {}", summary.status.as_str()));
        r.host = Some(host.to_owned());
        r.host_status = Some(summary.status);
        r.out_path = summary.out_path.clone();
        r.duration_seconds = Some(summary.duration_seconds);
        self.reporter.running(&r).await;
        summary
    }
}

/// How often the hosts of a running graph are looked for in the store, to be recorded early.
const EARLY_CHECK: Duration = Duration::from_secs(2);

/// What evaluation left: hosts to build (with their evaluation time), outcomes known already
/// (unchanged, failed), and whether shutdown cut it.
#[derive(Default)]
struct Evaluation {
    evaluated: Vec<(String, Evaluated, f64)>,
    outcomes: HashMap<String, (Outcome, f64)>,
    shutdown: bool,
}

/// What the build graph left.
#[derive(Default)]
struct Built {
    tracker: graph::Tracker,
    finished: graph::Finished,
    error: Option<BuildError>,
    shutdown: bool,
}
