//! Runs `git` with argument vectors in one repository; never through a shell. Credentials come from
//! git's own configuration; prompts are off, so a missing credential fails instead of hanging.

use std::path::{Path, PathBuf};

use tokio::process::Command;

#[derive(Debug, thiserror::Error)]
pub(super) enum GitError {
    #[error("cannot run git: {0}")]
    Spawn(std::io::Error),
    #[error("git {args} failed: {stderr}")]
    Failed { args: String, stderr: String },
}

pub(super) struct Git {
    dir: PathBuf,
}

impl Git {
    pub(super) fn new(dir: &Path) -> Self {
        Self { dir: dir.to_owned() }
    }

    pub(super) fn dir(&self) -> &Path {
        &self.dir
    }

    /// Runs `git -C <dir> <args>`; returns trimmed stdout.
    pub(super) async fn run(&self, args: &[&str]) -> Result<String, GitError> {
        let out = Command::new("git")
            .arg("-C")
            .arg(&self.dir)
            .args(args)
            .env("GIT_TERMINAL_PROMPT", "0")
            .stdin(std::process::Stdio::null())
            .output()
            .await
            .map_err(GitError::Spawn)?;
        if !out.status.success() {
            return Err(GitError::Failed {
                args: args.join(" "),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// The commit a remote branch points at, as just fetched.
    pub(super) async fn fetch_branch(&self, remote: &str, branch: &str) -> Result<String, GitError> {
        let refspec = format!("+refs/heads/{branch}:refs/remotes/{remote}/{branch}");
        self.run(&["fetch", "--quiet", "--", remote, &refspec]).await?;
        self.run(&["rev-parse", "--verify", &format!("refs/remotes/{remote}/{branch}^{{commit}}")]).await
    }
}
