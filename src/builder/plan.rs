//! The plan room, a request's first stage: the commit it builds (the branch's newest, or the
//! `rev` asked for, checked to be on the branch), the hosts of that commit's flake, and which
//! of them the target names. Either a [`Plan`] comes out, or how the request ends ([`Ending`]).
//!
//! Architecture invariant: the hosts a plan names are the flake's own names; nothing else
//! becomes a build, a record key or a metric label.

use tokio_util::sync::CancellationToken;

use super::error::BuildError;
use super::exec::Exec;
use super::job;
use super::queue::Job;

/// What a request builds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The flake reference, pinned to the commit where the URL allows it.
    pub flake: String,
    pub commit: Option<String>,
    /// The hosts to build, in the flake's order.
    pub hosts: Vec<String>,
    /// The request's branch is the repo's deploy branch: its results are the hosts' state.
    pub deploy: bool,
}

/// How a request ends before any host is built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending {
    /// The builder's shutdown came first.
    Interrupted,
    /// The request names what the repo does not have (a branch, a commit, a host).
    Rejected(String),
    /// Resolving or listing failed (the error, with its log tail).
    Failed(String),
}

/// A request that ended while planned, with the commit if it was resolved by then.
#[derive(Debug)]
pub struct Unplanned {
    pub ending: Ending,
    pub commit: Option<String>,
}

fn ending(e: BuildError) -> Ending {
    match e {
        BuildError::Shutdown => Ending::Interrupted,
        BuildError::Rejected(why) => Ending::Rejected(why),
        other => Ending::Failed(other.detail()),
    }
}

/// Plans `job`; `resolved` hears the commit as soon as it is known (so identical requests
/// can join the build before the hosts are listed).
pub(super) async fn plan(
    exec: &Exec,
    job: &Job,
    cancel: &CancellationToken,
    resolved: impl FnOnce(Option<String>),
) -> Result<Plan, Unplanned> {
    let (flake, commit) = exec
        .resolve(&job.repo.url, &job.branch, job.rev.as_deref(), cancel)
        .await
        .map_err(|e| Unplanned { ending: ending(e), commit: None })?;
    resolved(commit.clone());
    let failed = |ending| Unplanned { ending, commit: commit.clone() };
    // The flake's own host names: the only names that are built or become metric labels.
    let known = exec.list_hosts(&flake, cancel).await.map_err(|e| failed(ending(e)))?;
    if known.is_empty() {
        return Err(failed(Ending::Failed("the flake has no nixosConfigurations".into())));
    }
    let hosts = pick(known, &job.target, &job.repo.name).map_err(|why| failed(Ending::Rejected(why)))?;
    let deploy = job.branch == job.repo.branch;
    Ok(Plan { flake, commit, hosts, deploy })
}

/// The hosts `target` names among the flake's `known` hosts: all of them, or the one named;
/// an unknown name is refused with the names closest to it.
fn pick(known: Vec<String>, target: &str, repo: &str) -> Result<Vec<String>, String> {
    if target == "all" {
        return Ok(known);
    }
    if known.iter().any(|h| h == target) {
        return Ok(vec![target.to_owned()]);
    }
    let hint = if known.len() <= 10 {
        format!("the flake defines: {}", known.join(", "))
    } else {
        format!("closest: {} (of {} hosts)", job::closest(&known, target, 5).join(", "), known.len())
    };
    Err(format!("unknown host `{target}` in {repo}; {hint}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_target_picks_the_flakes_hosts() {
        let known = || vec!["web1".to_owned(), "web2".to_owned(), "db1".to_owned()];
        assert_eq!(pick(known(), "all", "fleet").unwrap(), ["web1", "web2", "db1"]);
        assert_eq!(pick(known(), "db1", "fleet").unwrap(), ["db1"]);
        assert_eq!(
            pick(known(), "web3", "fleet").unwrap_err(),
            "unknown host `web3` in fleet; the flake defines: web1, web2, db1"
        );
        let many: Vec<String> = (0..20).map(|i| format!("host{i}")).collect();
        let why = pick(many, "hots1", "fleet").unwrap_err();
        assert!(why.starts_with("unknown host `hots1` in fleet; closest: host1, "), "{why}");
        assert!(why.ends_with("(of 20 hosts)"), "{why}");
    }
}
