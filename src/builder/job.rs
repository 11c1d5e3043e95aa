//! Build request and reply messages (JSON over NATS) and their validation.
//!
//! Pure: serde types and checks, no I/O. The protocol is described with examples in
//! `docs/protocol.md`; replies carry `"version": 1`.

use serde::{Deserialize, Serialize};

/// Reply protocol version.
pub const PROTOCOL_VERSION: u32 = 1;
/// Subjects replies may go to: the builder's NATS user may publish only there.
pub const RESPONSE_PREFIX: &str = "build.responses.";

/// Where builders of a JetStream queue say, every few seconds while requests wait, how many
/// wait and how far the builders have taken them (a [`QueueState`]): a waiting client works out
/// its place from its request's sequence. No reply subject is ever this one (theirs are random).
pub const QUEUE_SUBJECT: &str = "build.responses.queue";

/// What waits in the JetStream queue, as a builder sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueState {
    pub stream: String,
    /// Requests no builder has taken yet.
    pub waiting: u64,
    /// The stream sequence of the newest request a builder took.
    pub taken_seq: u64,
}

/// A build request as published on `build.<repo>.<target>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildRequest {
    pub repo: String,
    pub target: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub branch: Option<String>,
    /// The exact commit to build (40 hex digits); default: the branch's current commit. A
    /// request with `rev` only joins a build of that very commit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rev: Option<String>,
    /// Only ask whether a builder serves the repo: the answer is one final reply at once, with
    /// the repo's URL (without credentials), and nothing is built.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub check: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<String>,
    /// Build only if the commit the branch resolves to was not built within this many seconds
    /// (every host of the target, by any builder): else the result is answered from the
    /// record. A scheduler on every builder then builds once per period for the fleet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub once_per_seconds: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Started,
    Progress,
    Completed,
    Failed,
    Rejected,
    /// Cut short by the builder's shutdown (after its grace): no result, not a failure. Send the
    /// request again.
    Interrupted,
}

impl Status {
    /// Final replies end a request.
    pub fn is_final(self) -> bool {
        matches!(self, Status::Completed | Status::Failed | Status::Rejected | Status::Interrupted)
    }
}

/// What a `progress` reply is about, so a client never reads it from the message's words.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// The request waits in this builder's queue (`queue_position`).
    Queued,
    /// The request joined an identical build in progress.
    Joined,
    /// The hosts are being evaluated (`progress`).
    Evaluating,
    /// The build graph started (`progress`; `host` when it is one host).
    Building,
    /// Build log lines (`log`, each `name> line`) and every host's progress.
    Log,
    /// One host's result (`host`, `out_path`, `duration_seconds`).
    HostDone,
    /// The running build goes on; nothing new to say.
    Heartbeat,
    /// The builder stopped before the build ended; the request goes back to the JetStream
    /// queue and is built again.
    Requeued,
    /// Said by the client itself: no reply for a while, and the request waits in JetStream.
    Waiting,
}

/// The NATS header in which a client says who asked for a build (`user@host`, `flake-update`,
/// `mcp`), for the builder's log. Optional; never trusted for anything else.
pub const REQUESTED_BY_HEADER: &str = "Hearth-Requested-By";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HostStatus {
    Success,
    Failure,
    /// Its build was cut short by shutdown: the host's state is unchanged.
    Interrupted,
    /// Its system is already its newest good generation: nothing was built, no generation
    /// made. Counts as a success.
    Unchanged,
}

impl HostStatus {
    /// The host has a good system for the request: built now, or already its newest.
    pub fn is_ok(self) -> bool {
        matches!(self, HostStatus::Success | HostStatus::Unchanged)
    }

    /// As the wire spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            HostStatus::Success => "success",
            HostStatus::Failure => "failure",
            HostStatus::Interrupted => "interrupted",
            HostStatus::Unchanged => "unchanged",
        }
    }
}

/// Where one host of a running build is, on `progress` replies (`progress`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Its system is being evaluated.
    Evaluating,
    /// Evaluated; the build of the whole fleet has not started yet.
    Evaluated,
    /// In the build, none of its derivations running now.
    Waiting,
    /// One or more of its derivations are being built.
    Building,
    /// Everything it needs is built.
    Done,
    /// Its evaluation or a derivation it needs failed.
    Failed,
    /// Already its newest good generation: nothing to build.
    Unchanged,
}

/// One host's progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostProgress {
    pub host: String,
    pub phase: Phase,
    /// Derivations of its closure built so far in this build, of `to_build`.
    #[serde(default)]
    pub built: usize,
    /// Derivations of its closure that this build has to build (0 until evaluated).
    #[serde(default)]
    pub to_build: usize,
    /// Names of its derivations being built now (a few).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub building: Vec<String>,
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
    /// What changed against the host's previous good system (on success).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub changes: Option<crate::nix::closure_diff::Changes>,
    /// With a `[bucket]`: how much of its closure the bucket held when the build ended, and how
    /// many paths were queued for upload then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uploaded: Option<crate::fleet::Pushed>,
}

impl HostSummary {
    /// A host the builder's shutdown cut: no result.
    pub fn interrupted(host: &str, duration_seconds: f64) -> Self {
        HostSummary {
            host: host.to_owned(),
            status: HostStatus::Interrupted,
            out_path: None,
            error: Some("interrupted by shutdown".into()),
            duration_seconds,
            changes: None,
            uploaded: None,
        }
    }
}

/// A reply on the request's `reply_to` subject.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    pub version: u32,
    pub status: Status,
    /// What a `progress` reply is about (absent on other replies).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<Kind>,
    pub repo: String,
    pub target: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub branch: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// The host's result, on `host_done` replies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_status: Option<HostStatus>,
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
    /// The repo's flake URL without credentials, on the reply to a `check` request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repo_url: Option<String>,
    /// Every host's progress, on `progress` replies of a running build.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<Vec<HostProgress>>,
    /// The newest build log lines (`name> line`), on `log` replies.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub log: Vec<String>,
    /// The builder that sent it (its `[builder] name`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub builder: Option<String>,
}

impl Reply {
    pub fn new(status: Status, repo: &str, target: &str) -> Self {
        Self {
            version: PROTOCOL_VERSION,
            status,
            kind: None,
            repo: repo.to_owned(),
            target: target.to_owned(),
            branch: None,
            commit: None,
            host: None,
            host_status: None,
            message: None,
            out_path: None,
            duration_seconds: None,
            queue_position: None,
            hosts: None,
            repo_url: None,
            progress: None,
            log: Vec::new(),
            builder: None,
        }
    }

    /// A progress reply of this kind.
    pub fn progress(kind: Kind, repo: &str, target: &str) -> Self {
        let mut r = Self::new(Status::Progress, repo, target);
        r.kind = Some(kind);
        r
    }

    pub fn message(mut self, m: impl Into<String>) -> Self {
        self.message = Some(m.into());
        self
    }
}

/// The last `max` bytes of `text` (at a character boundary), marked as cut when cut.
fn tail(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut start = text.len() - max;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    format!("[…]{}", &text[start..])
}

/// The reply as JSON no larger than `max` bytes (the NATS server's max payload): log tails in
/// host errors, then the message, are cut from the front until it fits, and the message says so.
/// An oversized message is never published, since NATS would drop it.
pub fn encode_within(reply: &Reply, max: usize) -> Vec<u8> {
    let encode = |r: &Reply| serde_json::to_vec(r).unwrap_or_default();
    let whole = encode(reply);
    if whole.len() <= max {
        return whole;
    }
    let note = format!(" [log tails cut to fit the NATS max payload of {max} bytes]");
    let mut budget = max / 2;
    // The log-tail budget is shared by the hosts.
    let hosts = reply.hosts.as_ref().map_or(0, Vec::len).max(1);
    loop {
        let mut r = reply.clone();
        for h in r.hosts.iter_mut().flatten() {
            h.error = h.error.as_deref().map(|e| tail(e, budget / hosts));
        }
        // The newest log lines are kept.
        let mut kept = 0;
        let from = r
            .log
            .iter()
            .rposition(|line| {
                kept += line.len() + 4;
                kept > budget
            })
            .map_or(0, |i| i + 1);
        r.log.drain(..from);
        let message = r.message.take().unwrap_or_default();
        let cut =
            if encode(&r).len() + message.len() + note.len() + 16 > max { tail(&message, budget) } else { message };
        r.message = Some(format!("{cut}{note}"));
        let bytes = encode(&r);
        if bytes.len() <= max || budget == 0 {
            return bytes;
        }
        budget /= 2;
    }
}

/// Up to `n` of `names` closest to `wanted` (edit distance), for "did you mean" hints.
pub fn closest<'a>(names: &'a [String], wanted: &str, n: usize) -> Vec<&'a str> {
    fn distance(a: &str, b: &str) -> usize {
        let b: Vec<char> = b.chars().collect();
        let mut row: Vec<usize> = (0..=b.len()).collect();
        for (i, ca) in a.chars().enumerate() {
            let mut prev = row[0];
            row[0] = i + 1;
            for (j, cb) in b.iter().enumerate() {
                let cur = row[j + 1];
                row[j + 1] = if ca == *cb { prev } else { 1 + prev.min(cur).min(row[j]) };
                prev = cur;
            }
        }
        row[b.len()]
    }
    let mut scored: Vec<(usize, &str)> = names.iter().map(|h| (distance(h, wanted), h.as_str())).collect();
    scored.sort();
    scored.into_iter().take(n).map(|(_, h)| h).collect()
}

/// A URL without its credentials (`user:token@`), safe to tell a client.
pub fn without_credentials(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => {
            let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
            let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
            format!("{scheme}://{host}{path}")
        }
        None => url.to_owned(),
    }
}

/// A git remote or flake URL reduced to what names the repository, so that two spellings of
/// one repo compare equal: `git+https://user@host/o/r.git?ref=x`, `ssh://git@host/o/r`,
/// `git@host:o/r.git` and `https://host/o/r/` all become `host/o/r`; a local path stays a path.
pub fn repo_identity(url: &str) -> String {
    let url = url.strip_prefix("git+").unwrap_or(url);
    let url = url.split(['?', '#']).next().unwrap_or(url);
    let rest = if let Some(r) = url.strip_prefix("github:") {
        format!("github.com/{r}")
    } else if let Some((_, r)) = url.split_once("://") {
        r.to_owned()
    } else if let Some((user_host, path)) = url.split_once(':').filter(|(h, _)| !h.contains('/')) {
        format!("{user_host}/{path}")
    } else {
        url.to_owned()
    };
    let rest = match rest.split_once('/') {
        Some((authority, path)) if !rest.starts_with('/') => {
            let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
            format!("{host}/{path}")
        }
        _ => rest,
    };
    rest.trim_end_matches('/').trim_end_matches(".git").trim_end_matches('/').to_owned()
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

/// A full git commit id: 40 lowercase hex digits.
pub fn is_valid_rev(s: &str) -> bool {
    s.len() == 40 && is_lower_hex(s)
}

/// A commit id as a request may give it: full, or abbreviated to 7 digits or more (resolved
/// by the builder, which refuses one that is not unique).
pub fn is_valid_rev_request(s: &str) -> bool {
    (7..=40).contains(&s.len()) && is_lower_hex(s)
}

fn is_lower_hex(s: &str) -> bool {
    s.bytes().all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
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
    #[error("invalid rev: must be a commit id (7 to 40 lowercase hex digits)")]
    BadRev,
    #[error("reply_to must be a subject under build.responses.")]
    BadReplyTo,
    #[error("the subject `{0}` does not match the request's repo and target")]
    SubjectMismatch(String),
    #[error("the build queue is full; try again later")]
    QueueFull,
    #[error("the builder is shutting down")]
    ShuttingDown,
    #[error("too many requests joined this build already; try again when it ends")]
    TooManyJoiners,
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
    if req.rev.as_deref().is_some_and(|r| !is_valid_rev_request(r)) {
        return fail(Rejection::BadRev);
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
    fn a_progress_reply_says_its_kind_and_carries_log_lines_apart() {
        let mut r = Reply::progress(Kind::Log, "fleet", "all").message("1 of 2 host(s) built");
        r.log = vec!["openssl-3.0.14> make".into()];
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["kind"], "log");
        assert_eq!(json["log"][0], "openssl-3.0.14> make");
        assert_eq!(serde_json::to_value(Kind::HostDone).unwrap(), "host_done");
        // A final reply has no kind and no log field; a reply of before either field reads.
        let done = serde_json::to_value(Reply::new(Status::Completed, "fleet", "all")).unwrap();
        assert!(done.get("kind").is_none() && done.get("log").is_none(), "{done}");
        let old: Reply =
            serde_json::from_str(r#"{"version":1,"status":"progress","repo":"r","target":"all","message":"x> y"}"#)
                .unwrap();
        assert_eq!((old.kind, old.log.len()), (None, 0));
        // Cut to fit: the newest log lines stay.
        let mut big = Reply::progress(Kind::Log, "fleet", "all");
        big.log = (0..2000).map(|i| format!("drv> line {i:04} {}", "x".repeat(100))).collect();
        let cut: Reply = serde_json::from_slice(&encode_within(&big, 64 * 1024)).unwrap();
        assert!(!cut.log.is_empty() && cut.log.len() < 2000);
        assert!(cut.log.last().unwrap().contains("line 1999"));
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
            ("build.nixos-servers.a", r#"{"repo":"nixos-servers","target":"a","rev":"HEAD"}"#, |r| {
                *r == Rejection::BadRev
            }),
            ("build.nixos-servers.a", r#"{"repo":"nixos-servers","target":"a","rev":"--upload-pack=x"}"#, |r| {
                *r == Rejection::BadRev
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
    fn oversized_replies_are_cut_to_fit() {
        let mut r = Reply::new(Status::Failed, "fleet", "all").message("14 of 14 host(s) failed");
        r.hosts = Some(
            (0..14)
                .map(|i| HostSummary {
                    host: format!("h{i}"),
                    status: HostStatus::Failure,
                    out_path: None,
                    error: Some(format!("nix build failed\n{}\nthe last line {i}", "log line\n".repeat(10_000))),
                    duration_seconds: 1.0,
                    changes: None,
                    uploaded: None,
                })
                .collect(),
        );
        let max = 64 * 1024;
        let bytes = encode_within(&r, max);
        assert!(bytes.len() <= max, "{} bytes", bytes.len());
        let back: Reply = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(back.status, Status::Failed);
        assert!(back.message.unwrap().contains("cut to fit"));
        let hosts = back.hosts.unwrap();
        assert_eq!(hosts.len(), 14);
        // The end of each log, where the error is, survives.
        assert!(hosts[13].error.as_deref().unwrap().ends_with("the last line 13"));
        // A reply that fits is left alone.
        let small = Reply::new(Status::Completed, "fleet", "a");
        assert_eq!(encode_within(&small, max), serde_json::to_vec(&small).unwrap());
    }

    #[test]
    fn repo_urls_compare_by_what_names_the_repo() {
        let same = [
            "git+https://tok:secret@git.example.org/o/r.git?ref=main",
            "https://git.example.org/o/r",
            "ssh://git@git.example.org/o/r.git",
            "git@git.example.org:o/r.git",
            "https://git.example.org/o/r/",
        ];
        for u in same {
            assert_eq!(repo_identity(u), "git.example.org/o/r", "{u}");
        }
        assert_eq!(repo_identity("git+file:///tmp/x/remote.git"), "/tmp/x/remote");
        assert_eq!(repo_identity("/tmp/x/remote.git"), "/tmp/x/remote");
        assert_ne!(repo_identity("https://git.example.org/o/other"), "git.example.org/o/r");
        assert_eq!(without_credentials("git+https://tok:secret@h/o/r.git"), "git+https://h/o/r.git");
        assert_eq!(without_credentials("git+file:///r"), "git+file:///r");
    }

    #[test]
    fn closest_names() {
        let hosts: Vec<String> = ["web1", "web2", "db1", "ns1"].iter().map(|s| s.to_string()).collect();
        assert_eq!(closest(&hosts, "webl", 2), vec!["web1", "web2"]);
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
