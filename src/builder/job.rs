//! Build request and reply messages (JSON over NATS) and their validation.
//!
//! Pure: serde types and checks, no I/O. The protocol is described with examples in
//! `docs/protocol.md`; replies carry `"version": 1`.

use serde::{Deserialize, Serialize};

/// Reply protocol version.
pub const PROTOCOL_VERSION: u32 = 1;
/// Subjects replies may go to: the builder's NATS user may publish only there.
pub const RESPONSE_PREFIX: &str = "build.responses.";

/// A build request as published on `build.<repo>.<target>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildRequest {
    pub repo: String,
    pub target: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub branch: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Started,
    Progress,
    Completed,
    Failed,
    Rejected,
}

impl Status {
    /// Final replies end a request.
    pub fn is_final(self) -> bool {
        matches!(self, Status::Completed | Status::Failed | Status::Rejected)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HostStatus {
    Success,
    Failure,
}

/// One host's result in a final reply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostSummary {
    pub host: String,
    pub status: HostStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub out_path: Option<String>,
    /// The error and the tail of the build log.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub duration_seconds: f64,
}

/// A reply on the request's `reply_to` subject.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    pub version: u32,
    pub status: Status,
    pub repo: String,
    pub target: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub branch: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub out_path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_seconds: Option<f64>,
    /// The place in the queue (1 = next), on `progress` replies to a waiting request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_position: Option<usize>,
    /// Per-host summary, on final replies of builds that ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hosts: Option<Vec<HostSummary>>,
}

impl Reply {
    pub fn new(status: Status, repo: &str, target: &str) -> Self {
        Self {
            version: PROTOCOL_VERSION,
            status,
            repo: repo.to_owned(),
            target: target.to_owned(),
            branch: None,
            commit: None,
            host: None,
            message: None,
            out_path: None,
            duration_seconds: None,
            queue_position: None,
            hosts: None,
        }
    }

    pub fn message(mut self, m: impl Into<String>) -> Self {
        self.message = Some(m.into());
        self
    }
}

/// `^[A-Za-z0-9][A-Za-z0-9._-]*$`, at most 253 characters: repo, target and host names.
pub fn is_valid_name(s: &str) -> bool {
    let mut bytes = s.bytes();
    matches!(bytes.next(), Some(c) if c.is_ascii_alphanumeric())
        && s.len() <= 253
        && bytes.all(|c| c.is_ascii_alphanumeric() || b"._-".contains(&c))
}

/// A branch name git would accept (`git check-ref-format --branch`), restricted to characters
/// that are safe in a flake URL query: letters, digits, `/`, `.`, `_`, `-`, `+`.
pub fn is_valid_branch(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 255
        && !s.starts_with(['-', '/', '.'])
        && !s.ends_with(['/', '.'])
        && !s.ends_with(".lock")
        && !s.contains("..")
        && !s.contains("//")
        && !s.contains("/.")
        && !s.contains("@{")
        && s.bytes().all(|c| c.is_ascii_alphanumeric() || b"/._-+".contains(&c))
}

/// A NATS subject we may publish a reply to.
pub fn is_valid_reply_subject(s: &str) -> bool {
    s.strip_prefix(RESPONSE_PREFIX).is_some_and(|id| {
        !id.is_empty()
            && id.len() <= 200
            && id.split('.').all(|t| !t.is_empty())
            && id.bytes().all(|c| c.is_ascii_alphanumeric() || b"._-".contains(&c))
    })
}

/// Why a request is refused; the text goes back in the `rejected` reply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("malformed request: {0}")]
    Malformed(String),
    #[error("unknown repo `{0}`")]
    UnknownRepo(String),
    #[error("invalid target: must be `all` or match ^[A-Za-z0-9][A-Za-z0-9._-]*$")]
    BadTarget,
    #[error("invalid branch name")]
    BadBranch,
    #[error("reply_to must be a subject under build.responses.")]
    BadReplyTo,
    #[error("the subject `{0}` does not match the request's repo and target")]
    SubjectMismatch(String),
    #[error("the build queue is full; try again later")]
    QueueFull,
    #[error("the builder is shutting down")]
    ShuttingDown,
}

/// Parses and validates a request received on `subject`. `known_repo` says whether a repo is
/// configured. On error, the request's fields (as far as they parsed) are returned for the reply.
pub fn parse_request(
    subject: &str,
    payload: &[u8],
    known_repo: impl Fn(&str) -> bool,
) -> Result<BuildRequest, Box<(Rejection, Option<BuildRequest>)>> {
    let req: BuildRequest =
        serde_json::from_slice(payload).map_err(|e| Box::new((Rejection::Malformed(e.to_string()), None)))?;
    let fail = |r: Rejection| Err(Box::new((r, Some(req.clone()))));
    if req.reply_to.as_deref().is_some_and(|r| !is_valid_reply_subject(r)) {
        return fail(Rejection::BadReplyTo);
    }
    if !is_valid_name(&req.repo) || !known_repo(&req.repo) {
        return fail(Rejection::UnknownRepo(req.repo.chars().take(64).collect()));
    }
    if req.target != "all" && !is_valid_name(&req.target) {
        return fail(Rejection::BadTarget);
    }
    if req.branch.as_deref().is_some_and(|b| !is_valid_branch(b)) {
        return fail(Rejection::BadBranch);
    }
    let expected = format!("build.{}.{}", req.repo, req.target);
    if subject != expected {
        return fail(Rejection::SubjectMismatch(subject.chars().take(128).collect()));
    }
    Ok(req)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(subject: &str, json: &str) -> Result<BuildRequest, Rejection> {
        parse_request(subject, json.as_bytes(), |r| r == "nixos-servers").map_err(|b| b.0)
    }

    #[test]
    fn validation_table() {
        let ok = r#"{"repo":"nixos-servers","target":"all","reply_to":"build.responses.abc"}"#;
        assert!(parse("build.nixos-servers.all", ok).is_ok());
        type Check = fn(&Rejection) -> bool;
        let cases: &[(&str, &str, Check)] = &[
            ("build.x.all", "not json", |r| matches!(r, Rejection::Malformed(_))),
            ("build.x.all", r#"{"repo":"x"}"#, |r| matches!(r, Rejection::Malformed(_))),
            ("build.other.all", r#"{"repo":"other","target":"all"}"#, |r| matches!(r, Rejection::UnknownRepo(_))),
            ("build.nixos-servers.a", r#"{"repo":"nixos-servers","target":"-rf"}"#, |r| *r == Rejection::BadTarget),
            ("build.nixos-servers.a", r#"{"repo":"nixos-servers","target":"a;b"}"#, |r| *r == Rejection::BadTarget),
            ("build.nixos-servers.a", r#"{"repo":"nixos-servers","target":"a","branch":"--upload-pack=x"}"#, |r| {
                *r == Rejection::BadBranch
            }),
            ("build.nixos-servers.a", r#"{"repo":"nixos-servers","target":"a","branch":"a..b"}"#, |r| {
                *r == Rejection::BadBranch
            }),
            ("build.nixos-servers.a", r#"{"repo":"nixos-servers","target":"a","reply_to":"_INBOX.x"}"#, |r| {
                *r == Rejection::BadReplyTo
            }),
            ("build.nixos-servers.b", r#"{"repo":"nixos-servers","target":"a"}"#, |r| {
                matches!(r, Rejection::SubjectMismatch(_))
            }),
        ];
        for (subject, json, check) in cases {
            let err = parse(subject, json).expect_err(json);
            assert!(check(&err), "{json}: {err:?}");
        }
    }

    #[test]
    fn names_and_branches() {
        for good in ["ns1", "web-01.home", "A_b"] {
            assert!(is_valid_name(good), "{good}");
        }
        for bad in ["", "-x", ".x", "a b", "a/b", "ä"] {
            assert!(!is_valid_name(bad), "{bad}");
        }
        for good in ["master", "flake-update/2026-11-25", "release-24.11"] {
            assert!(is_valid_branch(good), "{good}");
        }
        for bad in ["", "-x", "a..b", "a/", "x.lock", "a b", "a@{1}", "a:b", "a~1", "a^"] {
            assert!(!is_valid_branch(bad), "{bad}");
        }
    }
}
