//! How a step of a build can fail: the one error type of the builder's rooms (plan, eval,
//! graph), with the log tail a reply shows.

use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("cannot run {0}: {1}")]
    Spawn(String, std::io::Error),
    #[error("{message}")]
    Failed { message: String, tail: String },
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("shutdown")]
    Shutdown,
    #[error("unexpected output from {0}: {1}")]
    Output(String, String),
    /// The request names something the repo does not have (a branch, a commit on it).
    #[error("{0}")]
    Rejected(String),
    /// The command held more memory than it may, and was stopped.
    #[error("exceeded {} of memory", crate::nix::closure_diff::human_bytes(i64::try_from(*limit).unwrap_or(i64::MAX), false))]
    OutOfMemory { limit: u64 },
}

impl BuildError {
    /// The error with the log's tail, for the reply.
    pub fn detail(&self) -> String {
        match self {
            BuildError::Failed { message, tail } if !tail.is_empty() => format!("{message}\n{tail}"),
            other => other.to_string(),
        }
    }
}
