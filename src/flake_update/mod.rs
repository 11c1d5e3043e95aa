//! `hearth flake-update`: update a flake's lock on a branch, build every host through the
//! builder, and move the target branch only if all of them built.
//!
//! The target branch is only ever fast-forwarded with a plain push, so a target that moved during
//! the build is never overwritten. Exit codes: 0 promoted, unchanged or committed (no `--push`);
//! 1 a host failed (or git/nix failed); 2 refused; 3 no build result; 4 the target moved. Knows git, `nix flake` and the builder's NATS protocol; never
//! HTTP or the store.

mod git;
pub mod lock;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use serde::Serialize;

use crate::builder::cli::Display;
use crate::builder::client::{EXIT_FAILED, EXIT_REFUSED, NatsArgs, parse_duration, request_build};
use crate::builder::job::{HostStatus, HostSummary, Status, is_valid_branch, is_valid_name, repo_identity};
use crate::nix::version::NixVersion;
use git::Git;
use lock::InputChange;

/// Exit code when the target branch moved during the build.
pub const EXIT_TARGET_MOVED: u8 = 4;

#[derive(Debug, clap::Args)]
pub struct FlakeUpdateArgs {
    /// The repo's name on the builder.
    #[arg(long)]
    pub repo: String,
    /// A clone of the repo (its remote is where branches are pushed).
    #[arg(long, default_value = ".")]
    pub path: PathBuf,
    #[arg(long, default_value = "origin")]
    pub remote: String,
    /// The branch hosts deploy from.
    #[arg(long, default_value = "master")]
    pub target_branch: String,
    /// The branch the update is built on (default `flake-update/<UTC date>`).
    #[arg(long)]
    pub update_branch: Option<String>,
    /// Replace an existing remote update branch that hearth did not create (by default only an
    /// earlier `flake-update/…` branch of hearth's own is ever replaced).
    #[arg(long)]
    pub force_update_branch: bool,
    /// Update only these inputs (repeatable); default: all.
    #[arg(long = "input")]
    pub inputs: Vec<String>,
    /// Push the update branch, build it, and promote it. Without it: commit locally and stop.
    #[arg(long)]
    pub push: bool,
    #[command(flatten)]
    pub nats: NatsArgs,
    /// How long to wait for the build.
    #[arg(long, default_value = "5h", value_parser = parse_duration)]
    pub timeout: Duration,
    /// Print one JSON summary line at the end instead of progress.
    #[arg(long)]
    pub json: bool,
    /// The `nix` executable.
    #[arg(long, default_value = "nix")]
    pub nix: String,
}

/// The run's outcome, printed with `--json`.
#[derive(Debug, Serialize)]
pub struct Summary {
    /// `promoted`, `unchanged`, `committed` (no `--push`), `build_failed`, `target_moved` or `error`.
    pub status: &'static str,
    pub repo: String,
    pub target_branch: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub update_branch: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub commit: Option<String>,
    pub inputs: Vec<InputChange>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<HostSummary>,
    pub message: String,
}

fn today() -> String {
    crate::utc::day(crate::utc::now())
}

pub async fn run(args: FlakeUpdateArgs) -> ExitCode {
    let json = args.json;
    let (code, summary) = match update(&args).await {
        Ok(r) => r,
        Err((code, message)) => (
            code,
            Summary {
                status: "error",
                repo: args.repo.clone(),
                target_branch: args.target_branch.clone(),
                update_branch: None,
                commit: None,
                inputs: vec![],
                hosts: vec![],
                message,
            },
        ),
    };
    if json {
        println!("{}", serde_json::to_string(&summary).unwrap_or_default());
    } else {
        let stream: &mut dyn std::io::Write = if code == 0 { &mut std::io::stdout() } else { &mut std::io::stderr() };
        let _ = writeln!(stream, "{}: {}", summary.status, summary.message);
        for c in &summary.inputs {
            let old = c.old.as_deref().unwrap_or("(new)");
            let new = c.new.as_deref().unwrap_or("(removed)");
            let _ = writeln!(stream, "  input {}: {old} -> {new}", c.name);
        }
        // Failed hosts' log tails were shown with the build's final reply already.
        let failed: Vec<&str> =
            summary.hosts.iter().filter(|h| h.status == HostStatus::Failure).map(|h| h.host.as_str()).collect();
        if !failed.is_empty() {
            let _ = writeln!(stream, "  failed hosts: {}", failed.join(", "));
        }
    }
    ExitCode::from(code)
}

type Outcome = Result<(u8, Summary), (u8, String)>;

/// A final reply proves the update built only if it names the pushed commit and lists hosts,
/// every one of them a success.
fn built_exactly(reply: &crate::builder::job::Reply, commit: &str) -> bool {
    let hosts = reply.hosts.as_deref().unwrap_or_default();
    reply.status == Status::Completed
        && reply.commit.as_deref() == Some(commit)
        && !hosts.is_empty()
        && hosts.iter().all(|h| h.status.is_ok() && h.out_path.is_some())
}

/// What each host's system changed, as commit message text.
fn host_changes_text(hosts: &[HostSummary]) -> Option<String> {
    let mut text = String::from("What changed on each host:\n");
    let mut any = false;
    for h in hosts {
        let Some(c) = &h.changes else { continue };
        any = true;
        text.push_str(&format!("\n{}: {}\n", h.host, c.headline()));
        for line in c.lines() {
            text.push_str(&format!("  {line}\n"));
        }
    }
    any.then_some(text)
}

/// A commit with `commit`'s tree and parent and its message followed by the host changes;
/// `commit` itself when there are none.
async fn with_host_changes(repo: &Git, commit: &str, hosts: &[HostSummary]) -> Result<String, git::GitError> {
    let Some(text) = host_changes_text(hosts) else { return Ok(commit.to_owned()) };
    let tree = repo.run(&["rev-parse", &format!("{commit}^{{tree}}")]).await?;
    let parent = repo.run(&["rev-parse", &format!("{commit}^")]).await?;
    let message = repo.run(&["log", "-1", "--format=%B", commit]).await?;
    let message = format!("{}\n\n{text}", message.trim_end());
    repo.run(&["commit-tree", &tree, "-p", &parent, "-m", &message]).await
}

/// Refuses to go on unless a builder serves `--repo`, and builds it from the clone's remote.
async fn check_builder_builds_this_remote(args: &FlakeUpdateArgs, repo: &Git) -> Result<(), (u8, String)> {
    let client = args.nats.connect("hearth-flake-update").await?;
    let served = crate::builder::client::check_repo(&client, &args.repo).await?;
    let remote = repo
        .run(&["remote", "get-url", "--", &args.remote])
        .await
        .map_err(|e| (EXIT_REFUSED, format!("remote `{}`: {e}", args.remote)))?;
    let Some(url) = served.repo_url else { return Ok(()) };
    if repo_identity(&url) != repo_identity(&remote) {
        return Err((
            EXIT_REFUSED,
            format!(
                "the builder builds repo `{}` from {url}, but remote `{}` of {} is {}; nothing was pushed",
                args.repo,
                args.remote,
                args.path.display(),
                crate::builder::job::without_credentials(&remote)
            ),
        ));
    }
    Ok(())
}

/// Refuses to replace a remote branch that is not an earlier update of hearth's: a name under
/// `flake-update/` whose tip is a lock update commit.
async fn check_update_branch_is_ours(repo: &Git, remote: &str, branch: &str) -> Result<(), (u8, String)> {
    let Ok(tip) = repo.fetch_branch(remote, branch).await else { return Ok(()) };
    let subject = repo.run(&["log", "-1", "--format=%s", &tip]).await.unwrap_or_default();
    if branch.starts_with("flake-update/") && subject == lock::COMMIT_SUBJECT {
        return Ok(());
    }
    Err((
        EXIT_REFUSED,
        format!(
            "{remote} already has a branch `{branch}` that hearth did not create; \
             choose another --update-branch, or pass --force-update-branch to replace it"
        ),
    ))
}

async fn update(args: &FlakeUpdateArgs) -> Outcome {
    let update_branch = args.update_branch.clone().unwrap_or_else(|| format!("flake-update/{}", today()));
    if !is_valid_name(&args.repo) {
        return Err((EXIT_REFUSED, format!("invalid repo name `{}`", args.repo)));
    }
    for b in [&args.target_branch, &update_branch] {
        if !is_valid_branch(b) {
            return Err((EXIT_REFUSED, format!("invalid branch name `{b}`")));
        }
    }
    if update_branch == args.target_branch {
        return Err((EXIT_REFUSED, "the update branch must differ from the target branch".into()));
    }
    if let Some(bad) = args.inputs.iter().find(|i| !is_valid_name(i)) {
        return Err((EXIT_REFUSED, format!("invalid input name `{bad}`")));
    }
    let repo = Git::new(&args.path);
    let fail = |e: git::GitError| (EXIT_FAILED, e.to_string());
    if args.push {
        // Before anything is pushed: a builder serves the repo, from this clone's remote.
        check_builder_builds_this_remote(args, &repo).await?;
    }
    let base = repo.fetch_branch(&args.remote, &args.target_branch).await.map_err(fail)?;

    // 1. Update the lock in a temporary worktree of the target branch.
    let tmp = tempfile::tempdir().map_err(|e| (EXIT_FAILED, format!("temporary directory: {e}")))?;
    let wt_path = tmp.path().join("worktree");
    let wt_str = wt_path.to_string_lossy().into_owned();
    repo.run(&["worktree", "add", "--quiet", "--detach", &wt_str, &base]).await.map_err(fail)?;
    let result = update_in_worktree(args, &repo, &Git::new(&wt_path), &base, &update_branch).await;
    let _ = repo.run(&["worktree", "remove", "--force", &wt_str]).await;
    result
}

/// The Nix that `nix` is, asked once per run.
async fn nix_version(nix: &str) -> Result<NixVersion, (u8, String)> {
    let out = tokio::process::Command::new(nix)
        .arg("--version")
        .output()
        .await
        .map_err(|e| (EXIT_FAILED, format!("cannot run {nix} --version: {e}")))?;
    let text = String::from_utf8_lossy(&out.stdout);
    NixVersion::parse(&text).ok_or_else(|| (EXIT_FAILED, format!("cannot read the version of {nix}: {}", text.trim())))
}

async fn update_in_worktree(args: &FlakeUpdateArgs, repo: &Git, wt: &Git, base: &str, update_branch: &str) -> Outcome {
    let fail = |e: git::GitError| (EXIT_FAILED, e.to_string());
    let changes = update_lock(args, wt).await?;
    let mut summary = Summary {
        status: "unchanged",
        repo: args.repo.clone(),
        target_branch: args.target_branch.clone(),
        update_branch: None,
        commit: None,
        inputs: changes.clone(),
        hosts: vec![],
        message: format!("flake.lock of {} is up to date", args.target_branch),
    };
    if changes.is_empty() {
        return Ok((0, summary));
    }

    // 2. Commit it on the update branch.
    wt.run(&["add", "flake.lock"]).await.map_err(fail)?;
    wt.run(&["commit", "--quiet", "-m", &lock::commit_message(&changes)]).await.map_err(fail)?;
    let commit = wt.run(&["rev-parse", "HEAD"]).await.map_err(fail)?;
    repo.run(&["branch", "--force", update_branch, &commit]).await.map_err(fail)?;
    summary.update_branch = Some(update_branch.to_owned());
    summary.commit = Some(commit.clone());
    if !args.push {
        summary.status = "committed";
        summary.message = format!("{commit} on {update_branch} (not pushed: pass --push to build and promote)");
        return Ok((0, summary));
    }
    // Replace the update branch only if it is an earlier run's (or the operator says so).
    if !args.force_update_branch {
        check_update_branch_is_ours(repo, &args.remote, update_branch).await?;
    }
    repo.run(&["push", "--quiet", "--force", &args.remote, &format!("{commit}:refs/heads/{update_branch}")])
        .await
        .map_err(fail)?;

    // 3. Build every host from the update branch.
    if let Some(code) = build_update(args, &commit, update_branch, &mut summary).await? {
        return Ok((code, summary));
    }
    promote(args, repo, base, &commit, update_branch, summary).await
}

/// Step 1: updates the lock in the worktree (the inputs asked for, or all); returns what changed.
async fn update_lock(args: &FlakeUpdateArgs, wt: &Git) -> Result<Vec<InputChange>, (u8, String)> {
    let read_lock = || -> serde_json::Value {
        std::fs::read_to_string(wt.dir().join("flake.lock"))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or(serde_json::Value::Null)
    };
    let old = read_lock();
    // Nix only warns about an input the flake does not have; that is a mistake, said plainly.
    let known = lock::input_names(&old);
    if let Some(unknown) = args.inputs.iter().find(|i| !known.contains(i)) {
        return Err((EXIT_REFUSED, format!("the flake has no input `{unknown}`; its inputs: {}", known.join(", "))));
    }
    let mut nix = tokio::process::Command::new(&args.nix);
    nix.current_dir(wt.dir()).args(["--extra-experimental-features", "nix-command flakes"]);
    if args.inputs.is_empty() {
        nix.args(["flake", "update"]);
    } else if nix_version(&args.nix).await?.has_flake_update_inputs() {
        nix.args(["flake", "update"]).args(&args.inputs);
    } else {
        nix.args(["flake", "lock"]);
        for input in &args.inputs {
            nix.args(["--update-input", input]);
        }
    }
    let out = nix.output().await.map_err(|e| (EXIT_FAILED, format!("cannot run nix: {e}")))?;
    if !out.status.success() {
        return Err((EXIT_FAILED, format!("nix flake update failed: {}", String::from_utf8_lossy(&out.stderr).trim())));
    }
    Ok(lock::diff(&old, &read_lock()))
}

/// Builds every host at `commit` of the update branch; `Some(exit code)` if the build does not
/// prove the update good (the summary says why), `None` if it does.
async fn build_update(
    args: &FlakeUpdateArgs,
    commit: &str,
    update_branch: &str,
    summary: &mut Summary,
) -> Result<Option<u8>, (u8, String)> {
    let client = args.nats.connect("hearth-flake-update").await?;
    let mut display = Display::new(false);
    let json = args.json;
    // The request names the exact commit: it never joins a build of another commit.
    let reply =
        request_build(&client, &args.repo, "all", Some(update_branch), Some(commit), (args.timeout, None), |r, raw| {
            if !json {
                display.show(r, raw);
            }
        })
        .await?;
    summary.hosts = reply.hosts.clone().unwrap_or_default();
    let target = &args.target_branch;
    if reply.status == Status::Completed && !built_exactly(&reply, commit) {
        summary.status = "build_failed";
        summary.message = format!(
            "{target} left alone; {update_branch} kept: the builder reported commit {} and {} host(s), not every host of {commit}",
            reply.commit.as_deref().unwrap_or("(none)"),
            summary.hosts.len()
        );
        return Ok(Some(EXIT_FAILED));
    }
    if reply.status == Status::Completed {
        return Ok(None);
    }
    summary.status = "build_failed";
    let failed: Vec<&str> =
        summary.hosts.iter().filter(|h| h.status == HostStatus::Failure).map(|h| h.host.as_str()).collect();
    let why = if failed.is_empty() {
        reply.message.clone().unwrap_or_default()
    } else {
        format!("failed hosts: {}", failed.join(", "))
    };
    summary.message = format!("{target} left alone; {update_branch} kept: {why}");
    Ok(Some(if reply.status == Status::Rejected { EXIT_REFUSED } else { EXIT_FAILED }))
}

/// Steps 4 and 5: the built commit, with what changed on each host in its message,
/// fast-forwards the target (never forced: a target that moved meanwhile stays as it is), and
/// the update branch goes.
async fn promote(
    args: &FlakeUpdateArgs,
    repo: &Git,
    base: &str,
    built: &str,
    update_branch: &str,
    mut summary: Summary,
) -> Outcome {
    let fail = |e: git::GitError| (EXIT_FAILED, e.to_string());
    // Same tree and parent as the built commit, so it is exactly what was built.
    let commit = match with_host_changes(repo, built, &summary.hosts).await {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(err = %e, "cannot add the host changes to the commit message; promoting the built commit");
            built.to_owned()
        }
    };
    summary.commit = Some(commit.clone());
    let target_ref = format!("{commit}:refs/heads/{}", args.target_branch);
    if let Err(e) = repo.run(&["push", "--quiet", &args.remote, &target_ref]).await {
        let now = repo.fetch_branch(&args.remote, &args.target_branch).await.map_err(fail)?;
        if now != base {
            summary.status = "target_moved";
            summary.message = format!(
                "every host built, but {} moved from {} to {} during the build; left alone, {update_branch} kept",
                args.target_branch,
                &base[..base.len().min(12)],
                &now[..now.len().min(12)]
            );
            return Ok((EXIT_TARGET_MOVED, summary));
        }
        return Err(fail(e));
    }
    summary.status = "promoted";
    summary.message = format!("every host built; {} is now {commit}", args.target_branch);
    // The update is in the target now: its branch has done its job (a failed one is kept).
    if let Err(e) = repo.run(&["push", "--quiet", &args.remote, "--delete", update_branch]).await {
        tracing::warn!(branch = update_branch, err = %e, "cannot delete the promoted update branch");
    } else {
        summary.update_branch = None;
    }
    Ok((0, summary))
}
