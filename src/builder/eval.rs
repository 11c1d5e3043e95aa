//! Evaluation of the hosts' systems, in up to `eval_workers` Nix evaluator processes at once:
//! each host's toplevel derivation, its output path, and the derivations of its closure that are
//! not built yet (`nix build --dry-run --json`, which uses Nix's evaluation cache, so an
//! unchanged commit costs almost nothing).
//!
//! A host whose evaluation fails has its error; the others go on. Each evaluator is a command
//! of [`Exec`]: its own process group, stopped on timeout or shutdown. This room owns the
//! dry-run command and its parsing.

use futures::{Stream, StreamExt};
use tokio_util::sync::CancellationToken;

use super::error::BuildError;
use super::exec::{Exec, toplevel_attr};

/// One host's evaluated system.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Evaluated {
    /// The toplevel's derivation path.
    pub drv: String,
    /// Its `out` path.
    pub out: String,
    /// Derivations of its closure that have to be built (not valid, not substitutable).
    pub to_build: Vec<String>,
}

/// A derivation a dry run's stderr lists as to be built (what will be fetched is output
/// paths, never derivations): the line's path, else `None`.
fn listed_derivation(line: &str) -> Option<&str> {
    let line = line.trim();
    (line.starts_with('/') && line.ends_with(".drv") && !line.contains(char::is_whitespace)).then_some(line)
}

/// Reads `nix build --dry-run --json`: stdout's one derivation, stderr's list of what will be
/// built.
pub fn parse_dry_run(stdout: &str, stderr_lines: &[String]) -> Result<Evaluated, String> {
    let parsed: serde_json::Value = serde_json::from_str(stdout).map_err(|e| format!("not JSON: {e}"))?;
    let first = parsed.get(0).ok_or("no derivation")?;
    let drv = first.get("drvPath").and_then(|d| d.as_str()).ok_or("no drvPath")?;
    let out = first.get("outputs").and_then(|o| o.get("out")).and_then(|p| p.as_str()).ok_or("no `out` output")?;
    let mut to_build: Vec<String> =
        stderr_lines.iter().filter_map(|l| listed_derivation(l)).map(str::to_owned).collect();
    to_build.sort();
    to_build.dedup();
    Ok(Evaluated { drv: drv.to_owned(), out: out.to_owned(), to_build })
}

/// Evaluates one host's toplevel without building it: its derivation, output and what of its
/// closure is to build.
pub async fn evaluate(
    exec: &Exec,
    flake: &str,
    host: &str,
    cancel: &CancellationToken,
) -> Result<Evaluated, BuildError> {
    let mut cmd = exec.nix();
    cmd.args(["build", "--dry-run", "--json", "--no-link", "--no-write-lock-file"])
        .arg(format!("{flake}#{}", toplevel_attr(host)));
    let mut listed = Vec::new();
    let mut on_line = |line: &str| {
        if listed_derivation(line).is_some() {
            listed.push(line.to_owned());
        }
    };
    let out = match exec.run_bounded("nix build --dry-run", cmd, exec.eval_max_memory, cancel, &mut on_line).await {
        Ok(out) => out,
        Err(e @ BuildError::OutOfMemory { .. }) => {
            let message = format!("evaluation of {host} {e} (the bound is `[builder] eval_max_memory`)");
            return Err(BuildError::Failed { message, tail: String::new() });
        }
        Err(BuildError::Failed { message, tail }) => {
            // Why it ended (an exit status, or a signal: SIGKILL is most often the kernel's
            // out-of-memory killer) comes before the log's tail.
            let how = message.split_once(" failed: ").map_or(message.as_str(), |(_, how)| how);
            return Err(BuildError::Failed { message: format!("evaluation of {host} failed: {how}"), tail });
        }
        Err(e) => return Err(e),
    };
    parse_dry_run(&out, &listed).map_err(|e| BuildError::Output("nix build --dry-run".into(), e))
}

/// Evaluates `hosts` of `flake`, `workers` at a time; each result comes as it is ready (in
/// the order they finish). After `cancel`, no evaluator starts: the rest come as `Shutdown`.
pub fn evaluate_all<'a>(
    exec: &'a Exec,
    flake: &'a str,
    hosts: &'a [String],
    workers: usize,
    cancel: &'a CancellationToken,
) -> impl Stream<Item = (&'a str, Result<Evaluated, BuildError>)> + 'a {
    futures::stream::iter(hosts.iter())
        .map(move |host| async move {
            if cancel.is_cancelled() {
                return (host.as_str(), Err(BuildError::Shutdown));
            }
            (host.as_str(), evaluate(exec, flake, host, cancel).await)
        })
        .buffer_unordered(workers.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dry_run_says_what_is_to_build() {
        let stdout = r#"[{"drvPath":"/nix/store/0q-a.drv","outputs":{"out":"/nix/store/pn-a"}}]"#;
        let stderr: Vec<String> = [
            "these 2 derivations will be built:",
            "  /nix/store/9k-dep.drv",
            "  /nix/store/0q-a.drv",
            "these 1 paths will be fetched (0.01 MiB download, 0.02 MiB unpacked):",
            "  /nix/store/zz-fetched",
            "warning: something about /nix/store/xx-y.drv",
        ]
        .map(String::from)
        .to_vec();
        let e = parse_dry_run(stdout, &stderr).unwrap();
        assert_eq!(e.drv, "/nix/store/0q-a.drv");
        assert_eq!(e.out, "/nix/store/pn-a");
        assert_eq!(e.to_build, ["/nix/store/0q-a.drv", "/nix/store/9k-dep.drv"]);
        // Already built: nothing listed.
        assert!(parse_dry_run(stdout, &[]).unwrap().to_build.is_empty());
        for bad in ["", "[]", "{}", r#"[{"drvPath":"/nix/store/a.drv","outputs":{}}]"#] {
            assert!(parse_dry_run(bad, &[]).is_err(), "{bad}");
        }
    }
}
