//! Runs `git` and `nix` for one build: resolve a branch to a commit, list a flake's hosts,
//! read a build log, and keep a GC root; and the one way every command runs ([`Exec::run`]),
//! which evaluation (`eval.rs`) and the build graph (`graph.rs`) use for their own commands.
//!
//! Every command gets an argument vector (no shell); request fields arrive here validated. A
//! command runs in its own process group, and the whole group is killed on timeout or shutdown.

use std::collections::{HashSet, VecDeque};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::Command;
use tokio_util::sync::CancellationToken;

use super::error::BuildError;
use super::job::is_valid_name;
use super::record::now_seconds;
use crate::fleet::{BranchOrder, ORDER_ANCESTORS};
use crate::nix::version::NixVersion;

/// Log lines kept for a failure reply.
const TAIL_LINES: usize = 40;
/// Longest log line forwarded; longer lines are cut.
const MAX_LINE: usize = 2000;

/// Settings for running builds.
#[derive(Debug, Clone)]
pub struct Exec {
    pub nix: String,
    pub timeout: Duration,
    pub gcroots_dir: PathBuf,
    /// Bytes of memory one evaluator may hold.
    pub eval_max_memory: u64,
    /// Bare mirrors of the repos' branches, one per URL.
    pub git_cache_dir: PathBuf,
    /// The Nix in use, once asked.
    pub version: std::sync::Arc<tokio::sync::OnceCell<NixVersion>>,
}

const NIX_FEATURES: [&str; 2] = ["--extra-experimental-features", "nix-command flakes"];

/// How long `nix` gets to stop its builders after SIGTERM before the group is killed.
const TERM_GRACE: Duration = Duration::from_secs(10);

/// Sends `signal` to a process group. A plain syscall on a group we spawned.
fn signal_group(pid: u32, signal: libc::c_int) {
    if let Ok(pid) = i32::try_from(pid) {
        // SAFETY: kill(2) takes plain integers and touches no memory of ours.
        #[allow(unsafe_code)]
        unsafe {
            libc::kill(-pid, signal);
        }
    }
}

/// Stops a command's whole process group: SIGTERM first, so that `nix` kills its builders
/// (they run in sessions of their own, out of the group's reach), then SIGKILL after a grace.
async fn stop_group(child: &mut tokio::process::Child, pid: u32) {
    signal_group(pid, libc::SIGTERM);
    if tokio::time::timeout(TERM_GRACE, child.wait()).await.is_err() {
        tracing::warn!(pid, "command ignored SIGTERM; killing its process group");
    }
    signal_group(pid, libc::SIGKILL);
    let _ = child.wait().await;
}

/// Makes `cmd` get SIGTERM when hearth dies, even by SIGKILL (`PR_SET_PDEATHSIG`): `nix` then
/// stops its builders and exits, instead of finishing a build nobody will report and rooting
/// it. (The signal follows the thread that spawned it: tokio's worker threads live as long as
/// the runtime, and the builder stops its commands before the runtime ends.)
///
/// Under memory pressure the kernel kills a child before hearth: each child's `oom_score_adj`
/// is raised to [`CHILD_OOM_SCORE_ADJ`] (an evaluator is what grows; with the unit's
/// `OOMPolicy=continue` its build fails, saying SIGKILL, and the cache goes on).
fn die_with_hearth(cmd: &mut Command) {
    let parent = rustix::process::getpid();
    // SAFETY: the closure runs in the child between fork and exec; it only makes the prctl(2),
    // getppid(2), open(2), write(2) and close(2) system calls (async-signal-safe) and allocates
    // nothing (the path is a C string literal).
    #[allow(unsafe_code)]
    unsafe {
        cmd.pre_exec(move || {
            rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::TERM))?;
            // hearth died between fork and prctl: the signal would never come.
            if rustix::process::getppid() != Some(parent) {
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            // Raising it needs no privilege; a higher value inherited is kept (lowering is
            // refused), and without /proc the child runs as it is.
            use rustix::fs::{Mode, OFlags};
            if let Ok(fd) =
                rustix::fs::open(c"/proc/self/oom_score_adj", OFlags::WRONLY | OFlags::CLOEXEC, Mode::empty())
            {
                let _ = rustix::io::write(&fd, CHILD_OOM_SCORE_ADJ);
            }
            Ok(())
        });
    }
}

/// The `oom_score_adj` of every process hearth runs (of -1000 … 1000).
const CHILD_OOM_SCORE_ADJ: &[u8] = b"500";

/// How often a bounded command's memory is looked at.
const MEMORY_CHECK: Duration = Duration::from_millis(200);

/// The resident memory of process `pid` in bytes (`VmRSS` of `/proc/<pid>/status`), if it
/// still runs.
fn resident(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib = status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?;
    let kib: u64 = kib.trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kib * 1024)
}

/// Resolves once process `pid` holds more than `max` bytes; never without a bound.
async fn over_memory(pid: Option<u32>, max: Option<u64>) {
    let (Some(pid), Some(max)) = (pid, max) else { return std::future::pending().await };
    loop {
        tokio::time::sleep(MEMORY_CHECK).await;
        if resident(pid).is_some_and(|bytes| bytes > max) {
            return;
        }
    }
}

/// Runs `cmd`, streaming stderr lines to `on_line`, under `timeout` and `cancel` (and, with
/// `max_memory`, stopped once it holds more); returns stdout.
async fn run(
    what: &str,
    mut cmd: Command,
    (timeout, max_memory): (Duration, Option<u64>),
    cancel: &CancellationToken,
    on_line: &mut (dyn FnMut(&str) + Send),
) -> Result<String, BuildError> {
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).process_group(0).kill_on_drop(true);
    die_with_hearth(&mut cmd);
    let mut child = cmd.spawn().map_err(|e| BuildError::Spawn(what.to_owned(), e))?;
    let pid = child.id();
    let mut stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let mut tail: VecDeque<String> = VecDeque::with_capacity(TAIL_LINES);
    let output = async {
        let mut out = String::new();
        let read_out = async {
            if let Some(s) = stdout.as_mut() {
                let _ = s.read_to_string(&mut out).await;
            }
        };
        let read_err = async {
            if let Some(s) = stderr {
                let mut lines = BufReader::new(s).lines();
                while let Ok(Some(mut line)) = lines.next_line().await {
                    if line.len() > MAX_LINE {
                        let mut cut = MAX_LINE;
                        while !line.is_char_boundary(cut) {
                            cut -= 1;
                        }
                        line.truncate(cut);
                    }
                    on_line(&line);
                    if tail.len() == TAIL_LINES {
                        tail.pop_front();
                    }
                    tail.push_back(line);
                }
            }
        };
        tokio::join!(read_out, read_err);
        out
    };
    let work = async {
        let out = output.await;
        (child.wait().await, out)
    };
    let result = tokio::select! {
        r = tokio::time::timeout(timeout, work) => r.map_err(|_| BuildError::Timeout(timeout)),
        _ = cancel.cancelled() => Err(BuildError::Shutdown),
        () = over_memory(pid, max_memory) => Err(BuildError::OutOfMemory { limit: max_memory.unwrap_or(0) }),
    };
    match result {
        Ok((Ok(status), out)) if status.success() => Ok(out),
        Ok((Ok(status), _)) => Err(BuildError::Failed {
            message: format!("{what} failed: {}", how_it_ended(status)),
            tail: tail.into_iter().collect::<Vec<_>>().join("\n"),
        }),
        Ok((Err(e), _)) => Err(BuildError::Spawn(what.to_owned(), e)),
        Err(e) => {
            if let Some(pid) = pid {
                stop_group(&mut child, pid).await;
            }
            Err(e)
        }
    }
}

/// How a process that did not succeed ended, for a person: `exit status 1`, or the signal that
/// killed it, with the likely cause of a SIGKILL nobody here sent.
fn how_it_ended(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(libc::SIGKILL)) => "killed by SIGKILL (out of memory?)".to_owned(),
        (None, Some(sig)) => {
            let name = match sig {
                libc::SIGTERM => "SIGTERM",
                libc::SIGINT => "SIGINT",
                libc::SIGHUP => "SIGHUP",
                libc::SIGSEGV => "SIGSEGV (a crash)",
                libc::SIGABRT => "SIGABRT (an abort)",
                libc::SIGBUS => "SIGBUS (a crash)",
                _ => return format!("killed by signal {sig}"),
            };
            format!("killed by {name}")
        }
        (None, None) => status.to_string(),
    }
}

/// The git URL of a `git+…` flake reference, without its query.
fn git_url(flake_url: &str) -> Option<&str> {
    let rest = flake_url.strip_prefix("git+")?;
    Some(rest.split('?').next().unwrap_or(rest))
}

/// The commit of exactly `full_ref` in `git ls-remote` output (which matches ref name
/// suffixes: `a/refs/heads/master` also matches `refs/heads/master`).
fn exact_ref(ls_remote: &str, full_ref: &str) -> Result<String, String> {
    let branch = full_ref.strip_prefix("refs/heads/").unwrap_or(full_ref);
    let found: Vec<&str> = ls_remote
        .lines()
        .filter_map(|line| line.split_once('\t'))
        .filter(|(_, name)| *name == full_ref)
        .map(|(rev, _)| rev)
        .collect();
    match found.as_slice() {
        [] => Err(format!("branch `{branch}` not found")),
        [rev] if super::job::is_valid_rev(rev) => Ok((*rev).to_owned()),
        [_] => Err(format!("branch `{branch}`: git ls-remote gave no commit id")),
        _ => Err(format!("branch `{branch}` is ambiguous")),
    }
}

/// The attribute path of a host's system, each name quoted (a host may contain dots).
pub fn toplevel_attr(host: &str) -> String {
    format!("nixosConfigurations.\"{host}\".config.system.build.toplevel")
}

/// A flake reference at `branch` (and `rev`, where known).
fn flake_ref(url: &str, branch: &str, rev: Option<&str>) -> String {
    if url.starts_with("git+") {
        let sep = if url.contains('?') { '&' } else { '?' };
        match rev {
            Some(rev) => format!("{url}{sep}ref={branch}&rev={rev}"),
            None => format!("{url}{sep}ref={branch}"),
        }
    } else {
        url.to_owned()
    }
}

impl Exec {
    /// A `nix` command with the features hearth needs.
    pub(super) fn nix(&self) -> Command {
        let mut c = Command::new(&self.nix);
        c.args(NIX_FEATURES);
        c
    }

    /// Runs `cmd` under the build timeout and `cancel`, stderr line by line to `on_line`;
    /// returns its stdout.
    pub(super) async fn run(
        &self,
        what: &str,
        cmd: Command,
        cancel: &CancellationToken,
        on_line: &mut (dyn FnMut(&str) + Send),
    ) -> Result<String, BuildError> {
        run(what, cmd, (self.timeout, None), cancel, on_line).await
    }

    /// As [`Exec::run`], the command stopped once it holds more than `max_memory` bytes.
    pub(super) async fn run_bounded(
        &self,
        what: &str,
        cmd: Command,
        max_memory: u64,
        cancel: &CancellationToken,
        on_line: &mut (dyn FnMut(&str) + Send),
    ) -> Result<String, BuildError> {
        run(what, cmd, (self.timeout, Some(max_memory)), cancel, on_line).await
    }

    /// Resolves `branch` of a repo to the commit to build (`rev` if given, else the branch's
    /// current commit) and the flake reference pinned to it. For `git+` URLs the branch is
    /// looked up with `git ls-remote`, so a new commit is always seen (Nix would cache the
    /// branch for an hour); other references are refreshed by Nix and cannot pin a `rev`.
    pub async fn resolve(
        &self,
        url: &str,
        branch: &str,
        rev: Option<&str>,
        cancel: &CancellationToken,
    ) -> Result<(String, Option<String>), BuildError> {
        let Some(git) = git_url(url) else {
            if rev.is_some() {
                return Err(BuildError::Failed { message: "`rev` needs a git+ repo URL".into(), tail: String::new() });
            }
            return Ok((flake_ref(url, branch, None), None));
        };
        let full_ref = format!("refs/heads/{branch}");
        let mut cmd = Command::new("git");
        cmd.args(["ls-remote", "--", git, &full_ref]);
        let out = run("git ls-remote", cmd, (Duration::from_secs(300), None), cancel, &mut |_| {}).await?;
        let head = exact_ref(&out, &full_ref).map_err(BuildError::Rejected)?;
        let commit = match rev {
            Some(rev) if rev == head || (rev.len() >= 7 && head.starts_with(rev)) => head,
            Some(rev) => self.check_on_branch(git, branch, rev, cancel).await?,
            None => head,
        };
        Ok((flake_ref(url, branch, Some(&commit)), Some(commit)))
    }

    /// The full commit id of `rev` (full or a unique abbreviation), if it is reachable from
    /// `branch` of the repo at `git`: a commit of another branch is never built (or recorded) as
    /// this one's. The branch is fetched into a bare mirror of hearth's own, one per URL, so only
    /// what changed is fetched each time.
    async fn check_on_branch(
        &self,
        git: &str,
        branch: &str,
        rev: &str,
        cancel: &CancellationToken,
    ) -> Result<String, BuildError> {
        let mirror = self.fetch_branch(git, branch, cancel).await?;
        let mut parse = Command::new("git");
        parse
            .arg("-C")
            .arg(&mirror)
            .args(["rev-parse", "--verify", "--quiet", "--end-of-options"])
            .arg(format!("{rev}^{{commit}}"));
        let full = match run("git rev-parse", parse, (Duration::from_secs(60), None), cancel, &mut |_| {}).await {
            Ok(out) if super::job::is_valid_rev(out.trim()) => out.trim().to_owned(),
            Ok(_) | Err(BuildError::Failed { .. }) => {
                return Err(BuildError::Rejected(format!(
                    "commit {rev} is not on branch `{branch}` (or the abbreviation is not unique)"
                )));
            }
            Err(e) => return Err(e),
        };
        let mut ancestor = Command::new("git");
        ancestor.arg("-C").arg(&mirror).args(["merge-base", "--is-ancestor", &full, &format!("refs/heads/{branch}")]);
        match run("git merge-base", ancestor, (Duration::from_secs(60), None), cancel, &mut |_| {}).await {
            Ok(_) => Ok(full),
            Err(BuildError::Failed { .. }) => {
                Err(BuildError::Rejected(format!("commit {rev} is not on branch `{branch}`")))
            }
            Err(e) => Err(e),
        }
    }

    /// Fetches `branch` of the repo at `git` into a bare mirror of hearth's own (one per URL,
    /// so only what changed is fetched each time); returns the mirror.
    async fn fetch_branch(&self, git: &str, branch: &str, cancel: &CancellationToken) -> Result<PathBuf, BuildError> {
        use sha2::Digest;
        let name = hex::encode(&sha2::Sha256::digest(git.as_bytes())[..8]);
        let mirror = self.git_cache_dir.join(format!("{name}.git"));
        if !mirror.join("HEAD").exists() {
            tokio::fs::create_dir_all(&mirror)
                .await
                .map_err(|e| BuildError::Spawn(format!("mkdir {}", mirror.display()), e))?;
            let mut init = Command::new("git");
            init.args(["init", "--quiet", "--bare"]).arg(&mirror);
            run("git init", init, (Duration::from_secs(60), None), cancel, &mut |_| {}).await?;
        }
        let mut fetch = Command::new("git");
        fetch.arg("-C").arg(&mirror).args([
            "fetch",
            "--quiet",
            "--no-tags",
            "--force",
            "--",
            git,
            &format!("+refs/heads/{branch}:refs/heads/{branch}"),
        ]);
        run("git fetch", fetch, (Duration::from_secs(600), None), cancel, &mut |_| {}).await?;
        Ok(mirror)
    }

    /// Where `commit` stands in `branch`'s history as it is now: the commits that descend from
    /// it, its last [`ORDER_ANCESTORS`] ancestors, and when the branch was fetched. `None` for a
    /// repo that is not a git URL (no history to order by).
    pub async fn branch_order(
        &self,
        url: &str,
        branch: &str,
        commit: &str,
        cancel: &CancellationToken,
    ) -> Result<Option<BranchOrder>, BuildError> {
        let Some(git) = git_url(url) else { return Ok(None) };
        let fetched_at = now_seconds();
        let mirror = self.fetch_branch(git, branch, cancel).await?;
        let rev_list = |args: &[&str]| {
            let mut list = Command::new("git");
            list.arg("-C").arg(&mirror).arg("rev-list").args(args).arg("--");
            list
        };
        let lines = |out: String| -> HashSet<String> {
            out.lines().map(str::trim).filter(|c| super::job::is_valid_rev(c)).map(str::to_owned).collect()
        };
        let limit = Duration::from_secs(60);
        let descendants = rev_list(&["--ancestry-path", &format!("{commit}..refs/heads/{branch}")]);
        let newer = lines(run("git rev-list", descendants, (limit, None), cancel, &mut |_| {}).await?);
        let ancestors = rev_list(&[&format!("--max-count={ORDER_ANCESTORS}"), commit]);
        let older = lines(run("git rev-list", ancestors, (limit, None), cancel, &mut |_| {}).await?);
        Ok(Some(BranchOrder { newer, older, fetched_at }))
    }

    /// The names of the flake's `nixosConfigurations`, keeping only valid host names.
    pub async fn list_hosts(&self, flake: &str, cancel: &CancellationToken) -> Result<Vec<String>, BuildError> {
        let mut cmd = self.nix();
        cmd.args([
            "eval",
            "--json",
            "--no-write-lock-file",
            &format!("{flake}#nixosConfigurations"),
            "--apply",
            "builtins.attrNames",
        ]);
        let out = run("nix eval", cmd, (self.timeout, None), cancel, &mut |_| {}).await?;
        let names: Vec<String> =
            serde_json::from_str(&out).map_err(|e| BuildError::Output("nix eval".into(), e.to_string()))?;
        let (good, bad): (Vec<_>, Vec<_>) = names.into_iter().partition(|n| is_valid_name(n));
        if !bad.is_empty() {
            tracing::warn!(count = bad.len(), "skipping nixosConfigurations with unsafe names");
        }
        Ok(good)
    }

    /// Makes `link` an (indirect) GC root of the store path `path`, through Nix, so it holds
    /// wherever `link` lives.
    pub async fn add_root(
        &self,
        path: &str,
        link: &std::path::Path,
        cancel: &CancellationToken,
    ) -> Result<(), BuildError> {
        if let Some(dir) = link.parent() {
            tokio::fs::create_dir_all(dir)
                .await
                .map_err(|e| BuildError::Spawn(format!("mkdir {}", dir.display()), e))?;
        }
        let mut cmd = self.nix();
        cmd.args(["build", "--out-link"]).arg(link).arg(path);
        run("nix build (root)", cmd, (Duration::from_secs(300), None), cancel, &mut |_| {}).await.map(|_| ())
    }

    /// The Nix in use (`nix --version`, asked once).
    pub async fn nix_version(&self, cancel: &CancellationToken) -> Result<NixVersion, BuildError> {
        self.version
            .get_or_try_init(|| async {
                let mut cmd = Command::new(&self.nix);
                cmd.arg("--version");
                let out = run("nix --version", cmd, (Duration::from_secs(60), None), cancel, &mut |_| {}).await?;
                NixVersion::parse(&out).ok_or_else(|| BuildError::Output("nix --version".into(), out.trim().to_owned()))
            })
            .await
            .copied()
    }

    /// The last lines of the build log Nix keeps of `drv` (`nix log`), if it has one.
    pub async fn log_tail(&self, drv: &str, cancel: &CancellationToken) -> Option<String> {
        let mut cmd = self.nix();
        cmd.args(["log", drv]);
        let out = run("nix log", cmd, (Duration::from_secs(60), None), cancel, &mut |_| {}).await.ok()?;
        let lines: Vec<&str> = out.lines().collect();
        let from = lines.len().saturating_sub(TAIL_LINES);
        Some(lines[from..].join("\n"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_kernel_kills_a_child_before_hearth_under_memory_pressure() {
        let mut cmd = Command::new("cat");
        cmd.arg("/proc/self/oom_score_adj");
        let cancel = CancellationToken::new();
        let out = run("cat", cmd, (Duration::from_secs(30), None), &cancel, &mut |_| {}).await.unwrap();
        let child: i32 = out.trim().parse().unwrap();
        let own: i32 = std::fs::read_to_string("/proc/self/oom_score_adj").unwrap().trim().parse().unwrap();
        assert!(child >= 500 && child > own.min(499), "child {child}, hearth {own}");
    }

    #[test]
    fn an_ending_says_its_exit_status_or_signal() {
        use std::os::unix::process::ExitStatusExt;
        let ended = |raw| how_it_ended(std::process::ExitStatus::from_raw(raw));
        assert_eq!(ended(1 << 8), "exit status 1");
        assert_eq!(ended(libc::SIGKILL), "killed by SIGKILL (out of memory?)");
        assert_eq!(ended(libc::SIGSEGV), "killed by SIGSEGV (a crash)");
        assert_eq!(ended(libc::SIGUSR1), format!("killed by signal {}", libc::SIGUSR1));
    }

    #[test]
    fn flake_refs() {
        assert_eq!(git_url("git+https://h/r.git?dir=x"), Some("https://h/r.git"));
        assert_eq!(git_url("github:o/r"), None);
        assert_eq!(flake_ref("git+file:///r", "main", Some("ab")), "git+file:///r?ref=main&rev=ab");
        assert_eq!(flake_ref("git+file:///r?dir=x", "main", None), "git+file:///r?dir=x&ref=main");
    }

    #[test]
    fn only_the_exact_ref_counts() {
        let a = "a".repeat(40);
        let b = "b".repeat(40);
        let out = format!("{a}\trefs/heads/x/refs/heads/master\n{b}\trefs/heads/master\n");
        assert_eq!(exact_ref(&out, "refs/heads/master"), Ok(b.clone()));
        let spoof_only = format!("{a}\trefs/heads/x/refs/heads/master\n");
        assert!(exact_ref(&spoof_only, "refs/heads/master").unwrap_err().contains("not found"));
        assert!(exact_ref("", "refs/heads/master").is_err());
        assert!(exact_ref(&format!("{b}\trefs/heads/master\n{a}\trefs/heads/master\n"), "refs/heads/master").is_err());
        assert_eq!(toplevel_attr("web-01.home"), "nixosConfigurations.\"web-01.home\".config.system.build.toplevel");
    }
}
