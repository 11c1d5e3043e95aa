//! One build graph for the whole request: every evaluated host's system realised by one
//! `nix build --keep-going`, so a derivation several hosts share is built once and Nix's own
//! `max-jobs` spans the fleet; and, from its structured log, where each host is.
//!
//! [`Tracker`] is pure (events in, per-host progress and failed derivations out) and is tested
//! on logs recorded from real Nix; [`realise`] runs the command, [`realise_reporting`] sends
//! its progress, and [`why_failed`] says why a host's system is not there after it.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::error::BuildError;
use super::eval::Evaluated;
use super::exec::Exec;
use super::job::{HostProgress, Kind, Phase};
use super::nixlog::{self, Event, Parser};
use super::reply::{Heading, Reporter, Throttle};

/// Build log lines a progress reply carries at most (the newest).
const PROGRESS_LINES: usize = 20;

/// How many running derivation names a host's progress lists.
const BUILDING_LISTED: usize = 3;

/// What one host needs from the graph.
#[derive(Debug, Clone)]
struct HostNeeds {
    host: String,
    to_build: HashSet<String>,
}

/// Follows one graph's log: which derivations run, ended, failed; and so each host's progress.
#[derive(Debug, Default)]
pub struct Tracker {
    hosts: Vec<HostNeeds>,
    running: BTreeSet<String>,
    stopped: HashSet<String>,
    /// Derivations that started building and that an error names: they failed themselves (a
    /// derivation whose dependency failed never starts).
    failed: HashSet<String>,
    started: HashSet<String>,
    /// Error messages in order, for a failure no derivation explains.
    errors: Vec<String>,
}

impl Tracker {
    /// A tracker for these hosts, each with the derivations its evaluation said are to build.
    pub fn new<'a>(hosts: impl IntoIterator<Item = (&'a str, &'a Evaluated)>) -> Self {
        let hosts = hosts
            .into_iter()
            .map(|(host, e)| HostNeeds { host: host.to_owned(), to_build: e.to_build.iter().cloned().collect() })
            .collect();
        Self { hosts, ..Self::default() }
    }

    /// Takes in one event of the graph's log.
    pub fn observe(&mut self, event: &Event) {
        match event {
            Event::BuildStarted { drv } => {
                self.started.insert(drv.clone());
                self.running.insert(drv.clone());
            }
            Event::BuildStopped { drv } => {
                self.running.remove(drv);
                self.stopped.insert(drv.clone());
            }
            Event::Error { text, drvs } => {
                for drv in drvs.iter().filter(|d| self.started.contains(*d)) {
                    self.failed.insert(drv.clone());
                }
                if self.errors.len() < 100 {
                    self.errors.push(text.clone());
                }
            }
            Event::BuildLine { .. } | Event::Text(_) => {}
        }
    }

    /// The derivations of `host`'s closure that failed to build themselves, by name order.
    pub fn failed_for(&self, host: &str) -> Vec<String> {
        let Some(needs) = self.hosts.iter().find(|h| h.host == host) else { return Vec::new() };
        let mut failed: Vec<String> = needs.to_build.intersection(&self.failed).cloned().collect();
        failed.sort_by(|a, b| nixlog::drv_name(a).cmp(nixlog::drv_name(b)).then(a.cmp(b)));
        failed
    }

    /// The error messages the graph's log held, oldest first.
    pub fn errors(&self) -> &[String] {
        &self.errors
    }

    /// Every tracked host's progress now.
    pub fn progress(&self) -> Vec<HostProgress> {
        self.hosts
            .iter()
            .map(|h| {
                let built =
                    h.to_build.iter().filter(|d| self.stopped.contains(*d) && !self.failed.contains(*d)).count();
                let mut building: Vec<String> = h
                    .to_build
                    .iter()
                    .filter(|d| self.running.contains(*d))
                    .map(|d| nixlog::drv_name(d).to_owned())
                    .collect();
                building.sort();
                building.truncate(BUILDING_LISTED);
                let phase = if h.to_build.iter().any(|d| self.failed.contains(d)) {
                    Phase::Failed
                } else if built == h.to_build.len() {
                    Phase::Done
                } else if building.is_empty() {
                    Phase::Waiting
                } else {
                    Phase::Building
                };
                HostProgress { host: h.host.clone(), phase, built, to_build: h.to_build.len(), building }
            })
            .collect()
    }
}

/// Realises `drvs` (derivation paths) in one `nix build --keep-going`, handing each event of its
/// log to `on_event`. An error means some output was not built (which hosts: ask the store), or
/// that the command did not run to its end (timeout, shutdown).
pub async fn realise(
    exec: &Exec,
    drvs: &[String],
    cancel: &CancellationToken,
    on_event: &mut (dyn FnMut(Event) + Send),
) -> Result<(), BuildError> {
    if drvs.is_empty() {
        return Ok(());
    }
    let version = exec.nix_version(cancel).await?;
    let mut parser = Parser::new();
    let mut on_line = |line: &str| {
        if let Some(event) = parser.feed(line) {
            on_event(event);
        }
    };
    let installables: Vec<String> = drvs.iter().map(|d| version.drv_outputs(d)).collect();
    // Nothing is linked: the record roots what it keeps.
    let mut cmd = exec.nix();
    cmd.args(["build", "--keep-going", "--no-link", "--log-format", "internal-json"]).args(&installables);
    exec.run("nix build", cmd, cancel, &mut on_line).await.map(|_| ())
}

/// The derivations `evaluated` hosts need built, each once (a derivation many hosts share is one
/// node of the graph), in a stable order.
pub fn nodes<'a>(evaluated: impl IntoIterator<Item = &'a Evaluated>) -> Vec<String> {
    let drvs: BTreeSet<String> = evaluated.into_iter().map(|e| e.drv.clone()).collect();
    drvs.into_iter().collect()
}

/// Per host, the time its build ended in the graph: when its progress first said `done`.
#[derive(Debug, Default)]
pub struct Finished(HashMap<String, std::time::Instant>);

impl Finished {
    /// Notes the hosts that are done now; returns those newly done.
    pub fn note(&mut self, progress: &[HostProgress]) -> Vec<String> {
        let mut new = Vec::new();
        for p in progress.iter().filter(|p| matches!(p.phase, Phase::Done | Phase::Failed)) {
            if !self.0.contains_key(&p.host) {
                self.0.insert(p.host.clone(), std::time::Instant::now());
                new.push(p.host.clone());
            }
        }
        new
    }

    pub fn at(&self, host: &str) -> Option<std::time::Instant> {
        self.0.get(host).copied()
    }
}

/// Every host's progress outside the build graph: evaluating, evaluated, failed in
/// evaluation, unchanged.
pub struct Board(Vec<HostProgress>);

impl Board {
    pub fn new(hosts: &[String]) -> Self {
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

    pub fn set(&mut self, host: &str, phase: Phase, to_build: usize) {
        if let Some(p) = self.0.iter_mut().find(|p| p.host == host) {
            p.phase = phase;
            p.to_build = to_build;
        }
    }

    /// How many hosts are past evaluation.
    pub fn evaluated(&self) -> usize {
        self.0.iter().filter(|p| p.phase != Phase::Evaluating).count()
    }

    pub fn hosts(&self) -> Vec<HostProgress> {
        self.0.clone()
    }

    /// The board with the graph's hosts as the tracker has them.
    pub fn merged(&self, tracker: &Tracker) -> Vec<HostProgress> {
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

/// What the graph's log said while it ran.
struct Live {
    tracker: Tracker,
    lines: VecDeque<String>,
    changed: bool,
}

impl Live {
    fn observe(&mut self, event: Event) {
        self.tracker.observe(&event);
        if let Event::BuildLine { drv, line } = &event {
            if self.lines.len() == PROGRESS_LINES {
                self.lines.pop_front();
            }
            self.lines.push_back(format!("{}> {line}", nixlog::drv_name(drv)));
        }
        self.changed = true;
    }
}

/// Runs the build graph, sending every host's progress (and the newest build log lines) to
/// the running build's subscribers at most every `every`, and each host whose derivations are
/// all built to `done_hosts` as soon as its progress says so (its system may be recorded before the
/// rest of the graph ends). Returns the graph's result, its tracker, and when each host was done.
#[allow(clippy::too_many_arguments)]
pub async fn realise_reporting(
    exec: &Exec,
    drvs: &[String],
    tracker: Tracker,
    board: &Board,
    to: (&Reporter, &Heading),
    every: Duration,
    done_hosts: tokio::sync::mpsc::UnboundedSender<String>,
    cancel: &CancellationToken,
) -> (Result<(), BuildError>, Tracker, Finished) {
    let (reporter, heading) = to;
    let live = std::sync::Mutex::new(Live { tracker, lines: VecDeque::new(), changed: false });
    let done = tokio::sync::Notify::new();
    let mut finished = Finished::default();
    let run = async {
        let mut on_event = |event: Event| {
            if let Ok(mut l) = live.lock() {
                l.observe(event);
            }
        };
        let r = realise(exec, drvs, cancel, &mut on_event).await;
        done.notify_one();
        r
    };
    let forward = async {
        let mut throttle = Throttle::new(every.max(Duration::from_millis(50)));
        throttle.due();
        loop {
            let last = tokio::select! {
                _ = tokio::time::sleep(throttle.wait()) => false,
                _ = done.notified() => true,
            };
            throttle.due();
            let update = live.lock().ok().filter(|l| l.changed).map(|mut l| {
                l.changed = false;
                (board.merged(&l.tracker), l.lines.drain(..).collect::<Vec<String>>())
            });
            if let Some((progress, lines)) = update {
                for host in finished.note(&progress) {
                    if progress.iter().any(|p| p.host == host && p.phase == Phase::Done) {
                        let _ = done_hosts.send(host);
                    }
                }
                let built = progress.iter().filter(|p| matches!(p.phase, Phase::Done | Phase::Unchanged)).count();
                let mut r = heading.progress(Kind::Log).message(format!("{built} of {} host(s) built", progress.len()));
                r.progress = Some(progress);
                r.log = lines;
                reporter.running(&r).await;
            }
            if last {
                break;
            }
        }
    };
    let (result, ()) = tokio::join!(run, forward);
    let tracker = match live.into_inner() {
        Ok(l) => l.tracker,
        Err(poisoned) => poisoned.into_inner().tracker,
    };
    (result, tracker, finished)
}

/// Why `host`'s system is not in the store after the graph: the derivation of its closure
/// that failed, with the tail of its own build log (`nix log`), else what the graph said.
pub async fn why_failed(
    exec: &Exec,
    host: &str,
    tracker: &Tracker,
    graph_error: Option<&BuildError>,
    cancel: &CancellationToken,
) -> String {
    let failed = tracker.failed_for(host);
    let said: Vec<&str> = tracker.errors().iter().rev().take(5).map(String::as_str).collect();
    let said: Vec<&str> = said.into_iter().rev().collect();
    if let Some(drv) = failed.first() {
        let more = match failed.len() {
            1 => String::new(),
            n => format!(" (and {} more of its derivations)", n - 1),
        };
        // A derivation that failed before its builder said anything (it could not start, the
        // disk was full): what Nix said instead of its empty log.
        let tail = match exec.log_tail(drv, cancel).await.filter(|t| !t.trim().is_empty()) {
            Some(tail) => tail,
            None => said.join("\n"),
        };
        return format!("building {drv} failed{more}\n{tail}").trim_end().to_owned();
    }
    match graph_error {
        Some(BuildError::Failed { .. }) | None if !said.is_empty() => said.join("\n"),
        Some(e) => e.to_string(),
        None => "the build ended without this host's system".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn evaluated(drv: &str, to_build: &[&str]) -> Evaluated {
        Evaluated {
            drv: drv.to_owned(),
            out: drv.trim_end_matches(".drv").to_owned(),
            to_build: to_build.iter().map(|s| s.to_string()).collect(),
        }
    }

    /// The derivation path named `name` in a recorded log.
    fn drv(log: &str, name: &str) -> String {
        let suffix = format!("-{name}.drv");
        log.match_indices("/nix/store/")
            .map(|(at, _)| &log[at..])
            .filter_map(|rest| rest.get(..11 + 32 + suffix.len()))
            .find(|path| path.ends_with(&suffix))
            .unwrap_or_else(|| panic!("no {name} in the log"))
            .to_owned()
    }

    /// Recorded with the real Nix (scripts in the test data's README): host `a` needs `dep-s1`,
    /// `dep-a` and `a-x1`; host `b` needs `dep-s1`, `bad` (which fails) and `b-x1`.
    fn replay(version: &str) {
        let path = format!("{}/tests/data/nixlog/keep-going-{version}.jsonl", env!("CARGO_MANIFEST_DIR"));
        let log = std::fs::read_to_string(&path).unwrap();
        let [s1, dep_a, a, bad, b] = ["dep-s1", "dep-a", "a-x1", "bad", "b-x1"].map(|n| drv(&log, n));
        let host_a = evaluated(&a, &[&s1, &dep_a, &a]);
        let host_b = evaluated(&b, &[&s1, &bad, &b]);
        let mut t = Tracker::new([("a", &host_a), ("b", &host_b)]);
        let before = t.progress();
        assert_eq!((before[0].phase, before[0].built, before[0].to_build), (Phase::Waiting, 0, 3));
        let mut parser = Parser::new();
        let mut seen_building = false;
        for line in log.lines() {
            if let Some(e) = parser.feed(line) {
                t.observe(&e);
                seen_building |= t.progress().iter().any(|p| p.phase == Phase::Building && !p.building.is_empty());
            }
        }
        assert!(seen_building, "{version}: no host was ever seen building");
        let p = t.progress();
        assert_eq!((p[0].phase, p[0].built, p[0].to_build), (Phase::Done, 3, 3), "{version}: {p:?}");
        // `b` failed for `bad`: its shared dependency still counts as built, its own never ran.
        assert_eq!((p[1].phase, p[1].built), (Phase::Failed, 1), "{version}: {p:?}");
        assert_eq!(t.failed_for("b"), std::slice::from_ref(&bad), "{version}");
        assert!(t.failed_for("a").is_empty(), "{version}");
        assert!(t.errors().iter().any(|e| e.contains(&bad)), "{version}: {:?}", t.errors());
        assert_eq!(nodes([&host_b, &host_a, &host_a]), {
            let mut v = vec![a, b];
            v.sort();
            v
        });
    }

    #[test]
    fn a_keep_going_log_of_nix_2_8_gives_each_host_its_outcome() {
        replay("2.8.0");
    }

    #[test]
    fn a_keep_going_log_of_nix_2_34_gives_each_host_its_outcome() {
        replay("2.34.8");
    }

    #[test]
    fn a_host_with_nothing_to_build_is_done_at_once() {
        let e = evaluated("/nix/store/aa-h.drv", &[]);
        let t = Tracker::new([("h", &e)]);
        assert_eq!(t.progress()[0].phase, Phase::Done);
        let mut f = Finished::default();
        assert_eq!(f.note(&t.progress()), ["h"]);
        assert!(f.note(&t.progress()).is_empty());
        assert!(f.at("h").is_some());
    }
}
