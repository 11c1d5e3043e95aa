//! The NATS side of `hearth build`, shared by the CLI, flake-update and MCP: connect as a
//! deployer, publish a build request, and follow its replies to the final one (through a
//! builder's silence, JetStream's keeping, a refused permission). No terminal output here:
//! `cli.rs` displays what this hears.
//!
//! Exit codes: 0 every host built; 1 the build failed; 2 the request was refused (bad arguments,
//! rejected, or no builder serves the repo); 3 no final reply (timeout or NATS unreachable).
//! Success is judged from the final reply only.

use std::path::PathBuf;
use std::time::Duration;

use futures::StreamExt;

use super::config::NatsAuth;
use super::job::{self, BuildRequest, Kind, Reply, Status};

/// Parses `90`, `90s`, `30m`, `4h`, `1d`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s.find(|c: char| !c.is_ascii_digit()).map(|i| s.split_at(i)).unwrap_or((s, ""));
    let n: u64 = num.parse().map_err(|_| format!("`{s}` is not a duration like 90s, 30m or 4h"))?;
    let mult = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => return Err(format!("`{s}`: unknown unit `{unit}` (s, m, h, d)")),
    };
    Ok(Duration::from_secs(n.saturating_mul(mult)))
}

pub const EXIT_FAILED: u8 = 1;
pub const EXIT_REFUSED: u8 = 2;
pub const EXIT_NO_RESULT: u8 = 3;
/// Ctrl-C: the client stopped following; the build itself goes on.
pub const EXIT_INTERRUPTED: u8 = 130;

/// A random id for reply subjects and build ids.
pub fn random_id() -> String {
    let mut b = [0u8; 12];
    // Without OS randomness, fall back to time and pid: the id only has to be unique.
    if getrandom::fill(&mut b).is_err() {
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        return format!("{t:x}{:x}", std::process::id());
    }
    hex::encode(b)
}

/// NATS connection flags shared by `hearth build` and `hearth flake-update`.
#[derive(Debug, Clone, clap::Args)]
pub struct NatsArgs {
    #[arg(long, env = "HEARTH_NATS_URL", default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,
    #[arg(long, env = "HEARTH_NKEY_SEED_FILE")]
    pub nkey_seed_file: Option<PathBuf>,
    #[arg(long, env = "HEARTH_CREDS_FILE")]
    pub creds_file: Option<PathBuf>,
    /// How long the builder may say nothing before it is taken for gone, e.g. `2m` (a running
    /// build says something at least every 20 s). With a JetStream queue the request is not
    /// lost: it is only said to be waiting, and the wait goes on.
    #[arg(long, env = "HEARTH_SILENCE_TIMEOUT", default_value = "2m", value_parser = parse_duration)]
    pub silence_timeout: Duration,
}

/// A deployer's NATS connection, and the errors the server reported on it (a permissions
/// violation arrives as an asynchronous error, never as a reply).
pub struct Deployer {
    pub client: async_nats::Client,
    errors: tokio::sync::watch::Receiver<Option<String>>,
    /// Who asks: the client's name and the local `user@host`, for the builder's log.
    requested_by: String,
    silence: Duration,
}

impl NatsArgs {
    /// Connects as a deployer; errors carry the exit code to use.
    pub async fn connect(&self, name: &str) -> Result<Deployer, (u8, String)> {
        let auth = NatsAuth::load(self.nkey_seed_file.as_deref(), self.creds_file.clone())
            .map_err(|e| (EXIT_REFUSED, e.to_string()))?;
        let options = auth.options().await.map_err(|e| (EXIT_REFUSED, format!("NATS credentials: {e}")))?;
        let (tx, errors) = tokio::sync::watch::channel(None);
        let client = options
            .name(name)
            .connection_timeout(Duration::from_secs(10))
            .event_callback(move |event| {
                if let async_nats::Event::ServerError(e) = event {
                    let _ = tx.send(Some(e.to_string()));
                }
                async {}
            })
            .connect(&self.nats_url)
            .await
            .map_err(|e| (EXIT_NO_RESULT, format!("cannot connect to {}: {e}", self.nats_url)))?;
        let user = std::env::var("USER").unwrap_or_else(|_| "?".into());
        let host = rustix::system::uname().nodename().to_string_lossy().into_owned();
        Ok(Deployer { client, errors, requested_by: format!("{name} {user}@{host}"), silence: self.silence_timeout })
    }
}

impl Deployer {
    /// Publishes `request` on its subject, replies to `reply_to`, with `id` as its message id.
    async fn publish(&self, request: &BuildRequest, id: &str, reply_to: String) -> Result<(), (u8, String)> {
        let payload = serde_json::to_vec(request).map_err(|e| (EXIT_REFUSED, e.to_string()))?;
        // The reply subject lets the server answer "no responders" when no builder serves the
        // repo, and a JetStream stream that captures the request answer with its place in it.
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(job::REQUESTED_BY_HEADER, self.requested_by.as_str());
        // A publish retried (by the client library, or a flake-update run again) is one request.
        headers.insert("Nats-Msg-Id", id);
        let subject = format!("build.{}.{}", request.repo, request.target);
        self.client
            .publish_with_reply_and_headers(subject, reply_to, headers, payload.into())
            .await
            .map_err(|e| (EXIT_NO_RESULT, format!("publish: {e}")))?;
        self.client.flush().await.map_err(|e| (EXIT_NO_RESULT, format!("flush: {e}")))
    }
}

/// Checks a request's names as the builder will, before anything is sent.
pub fn validate(repo: &str, target: &str, branch: Option<&str>) -> Result<(), (u8, String)> {
    if !job::is_valid_name(repo) {
        return Err((EXIT_REFUSED, format!("invalid repo name `{repo}`")));
    }
    if target != "all" && !job::is_valid_name(target) {
        return Err((EXIT_REFUSED, format!("invalid target `{target}`")));
    }
    if branch.is_some_and(|b| !job::is_valid_branch(b)) {
        return Err((EXIT_REFUSED, "invalid branch name".into()));
    }
    Ok(())
}

/// Checks a commit id as the builder will.
fn validate_rev(rev: Option<&str>) -> Result<(), (u8, String)> {
    match rev {
        Some(r) if !job::is_valid_rev_request(r) => {
            Err((EXIT_REFUSED, format!("invalid rev `{r}`: give a commit id (7 to 40 lowercase hex digits)")))
        }
        _ => Ok(()),
    }
}

/// Publishes a build request and follows it to its final reply, calling `on_reply` for every
/// reply (with its raw JSON). Errors carry the exit code: refused (2) or no result (3).
pub async fn request_build(
    client: &Deployer,
    repo: &str,
    target: &str,
    branch: Option<&str>,
    rev: Option<&str>,
    (timeout, once_per): (Duration, Option<Duration>),
    on_reply: impl FnMut(&Reply, &[u8]),
) -> Result<Reply, (u8, String)> {
    validate(repo, target, branch)?;
    validate_rev(rev)?;
    let request = BuildRequest {
        repo: repo.to_owned(),
        target: target.to_owned(),
        branch: branch.map(str::to_owned),
        rev: rev.map(str::to_owned),
        check: false,
        reply_to: None,
        once_per_seconds: once_per.map(|d| d.as_secs()),
    };
    exchange(client, request, timeout, on_reply).await
}

/// Asks whether a builder serves `repo`, without building anything: its reply carries the
/// repo's URL (without credentials) and default branch.
pub async fn check_repo(client: &Deployer, repo: &str) -> Result<Reply, (u8, String)> {
    validate(repo, "all", None)?;
    let request = BuildRequest {
        repo: repo.to_owned(),
        target: "all".to_owned(),
        branch: None,
        rev: None,
        check: true,
        reply_to: None,
        once_per_seconds: None,
    };
    exchange(client, request, Duration::from_secs(30), |_, _| {}).await
}

/// Publishes `request` with a fresh reply subject and reads replies until a final one.
async fn exchange(
    deployer: &Deployer,
    mut request: BuildRequest,
    timeout: Duration,
    mut on_reply: impl FnMut(&Reply, &[u8]),
) -> Result<Reply, (u8, String)> {
    let id = random_id();
    let reply_to = format!("{}{id}", job::RESPONSE_PREFIX);
    let client = &deployer.client;
    let mut sub = client.subscribe(reply_to.clone()).await.map_err(|e| (EXIT_NO_RESULT, format!("subscribe: {e}")))?;
    // Where the JetStream queue stands (nothing comes here from a core-mode builder).
    let mut queue =
        client.subscribe(job::QUEUE_SUBJECT).await.map_err(|e| (EXIT_NO_RESULT, format!("subscribe: {e}")))?;
    request.reply_to = Some(reply_to.clone());
    deployer.publish(&request, &id, reply_to).await?;
    let mut errors = deployer.errors.clone();
    let mut follow = Following::new(&request, deployer.silence, timeout);
    loop {
        let next = tokio::select! {
            next = tokio::time::timeout_at(follow.quiet_until(), sub.next()) => next,
            Ok(()) = errors.changed() => {
                let error = errors.borrow_and_update().clone().unwrap_or_default();
                follow.server_error(&error)?;
                continue;
            }
            Some(state) = queue.next() => {
                if let Some(note) = follow.queue_state(&state.payload) {
                    let raw = serde_json::to_vec(&note).unwrap_or_default();
                    on_reply(&note, &raw);
                }
                continue;
            }
        };
        let msg = match next {
            Ok(Some(m)) => m,
            Ok(None) => return Err((EXIT_NO_RESULT, "the NATS subscription ended".into())),
            Err(_) => {
                if let Some(note) = follow.silence()? {
                    let raw = serde_json::to_vec(&note).unwrap_or_default();
                    on_reply(&note, &raw);
                }
                continue;
            }
        };
        if let Some(reply) = follow.heard(&msg)? {
            on_reply(&reply, &msg.payload);
            if reply.status.is_final() {
                return Ok(reply);
            }
        }
    }
}

/// One request followed: when it was last heard of, its deadline, and where JetStream keeps it.
struct Following<'a> {
    request: &'a BuildRequest,
    silence: Duration,
    timeout: Duration,
    deadline: tokio::time::Instant,
    heard: tokio::time::Instant,
    /// Where JetStream keeps the request: it outlives any builder.
    durable: Option<(String, u64)>,
    said_waiting: bool,
    /// The builder that took the request (from its replies), once one did.
    taken_by: Option<String>,
    /// The place in the JetStream queue last said.
    place: Option<u64>,
}

/// How long a builder that took a request may say nothing (it sends a heartbeat every 20 s)
/// before the client says it may have stopped.
const STALL: Duration = Duration::from_secs(45);

impl<'a> Following<'a> {
    fn new(request: &'a BuildRequest, silence: Duration, timeout: Duration) -> Self {
        let now = tokio::time::Instant::now();
        Self {
            request,
            silence: silence.max(Duration::from_secs(1)),
            timeout,
            deadline: now + timeout,
            heard: now,
            durable: None,
            said_waiting: false,
            taken_by: None,
            place: None,
        }
    }

    /// When the builder's silence (or the deadline) ends the wait for the next reply.
    fn quiet_until(&self) -> tokio::time::Instant {
        // A durable request a builder took: its stopping is said sooner (another builder takes
        // the request over once its ack wait ends).
        let quiet = match (&self.durable, &self.taken_by) {
            (Some(_), Some(_)) => self.silence.min(STALL),
            _ => self.silence,
        };
        (self.heard + quiet).min(self.deadline)
    }

    /// A builder's word on the JetStream queue: this request's place in it, while no builder
    /// has taken it, when the place changed.
    fn queue_state(&mut self, payload: &[u8]) -> Option<Reply> {
        let state = serde_json::from_slice::<job::QueueState>(payload).ok()?;
        let (stream, seq) = self.durable.as_ref()?;
        if self.taken_by.is_some() || *stream != state.stream || *seq <= state.taken_seq {
            return None;
        }
        let place = (seq - state.taken_seq).min(state.waiting.max(1));
        if self.place.replace(place) == Some(place) {
            return None;
        }
        let mut note = Reply::progress(Kind::Queued, &self.request.repo, &self.request.target).message(format!(
            "waiting in the JetStream queue {stream}: position {place} of {} (every builder is busy)",
            state.waiting
        ));
        note.queue_position = usize::try_from(place).ok();
        Some(note)
    }

    /// An error the server reported: a permissions violation ends the request.
    fn server_error(&self, error: &str) -> Result<(), (u8, String)> {
        if error.to_ascii_lowercase().contains("permissions violation") {
            let (repo, target) = (&self.request.repo, &self.request.target);
            let prefix = job::RESPONSE_PREFIX;
            return Err((
                EXIT_REFUSED,
                format!(
                    "NATS refused this request ({error}): these credentials may not publish to build.{repo}.{target} or subscribe to {prefix}>"
                ),
            ));
        }
        tracing::warn!(%error, "NATS server error");
        Ok(())
    }

    /// Nothing heard for the silence timeout: the end (no result), or, for a request JetStream
    /// keeps, a note (once) that it waits there.
    fn silence(&mut self) -> Result<Option<Reply>, (u8, String)> {
        if tokio::time::Instant::now() >= self.deadline {
            return Err((EXIT_NO_RESULT, format!("no final reply within {:?}", self.timeout)));
        }
        let secs = self.silence.as_secs();
        let Some((stream, seq)) = &self.durable else {
            return Err((
                EXIT_NO_RESULT,
                format!(
                    "the builder went silent: no reply for {secs}s (it may have stopped or lost NATS); the request is gone with it: send it again"
                ),
            ));
        };
        // Not lost: the stream keeps it until a builder has answered it.
        let quiet = (tokio::time::Instant::now() - self.heard).as_secs();
        self.heard = tokio::time::Instant::now();
        if std::mem::replace(&mut self.said_waiting, true) {
            return Ok(None);
        }
        let message = match &self.taken_by {
            Some(builder) => format!(
                "builder {builder} has said nothing for {quiet}s: it may have stopped; the request stays in JetStream stream {stream} (#{seq}) and goes to another builder once its ack wait ends"
            ),
            None => format!(
                "no reply for {secs}s: the request waits in JetStream stream {stream} (#{seq}); a free builder takes it"
            ),
        };
        Ok(Some(Reply::progress(Kind::Waiting, &self.request.repo, &self.request.target).message(message)))
    }

    /// A message on the reply subject: a build reply, JetStream's answer to the publish (kept,
    /// or refused), "no responders", or noise (ignored).
    fn heard(&mut self, msg: &async_nats::Message) -> Result<Option<Reply>, (u8, String)> {
        self.heard = tokio::time::Instant::now();
        if msg.status == Some(async_nats::StatusCode::NO_RESPONDERS) {
            return Err((EXIT_REFUSED, format!("no builder serves repo `{}`", self.request.repo)));
        }
        if let Ok(ack) = serde_json::from_slice::<StreamAck>(&msg.payload) {
            match (ack.stream, ack.seq, ack.error) {
                (_, _, Some(e)) => {
                    return Err((
                        EXIT_NO_RESULT,
                        format!("the JetStream queue refused the request: {}", e.description),
                    ));
                }
                (Some(stream), Some(seq), None) => {
                    self.durable = Some((stream, seq));
                    return Ok(None);
                }
                _ => {}
            }
        }
        let Ok(reply) = serde_json::from_slice::<Reply>(&msg.payload) else {
            tracing::warn!("ignoring a reply that is not a build reply");
            return Ok(None);
        };
        self.said_waiting = false;
        if let Some(builder) = &reply.builder {
            self.taken_by = Some(builder.clone());
        }
        Ok(Some(reply))
    }
}

/// What a JetStream stream answers a publish it captured: its name and the message's place, or
/// why it refused it (the stream is full, say).
#[derive(serde::Deserialize)]
struct StreamAck {
    stream: Option<String>,
    seq: Option<u64>,
    error: Option<StreamAckError>,
}

#[derive(serde::Deserialize)]
struct StreamAckError {
    #[serde(default)]
    description: String,
}

/// The exit code for a final reply.
pub fn exit_code(reply: &Reply) -> u8 {
    match reply.status {
        Status::Completed => 0,
        Status::Rejected => EXIT_REFUSED,
        // No result: the builder stopped; the same request may be sent again.
        Status::Interrupted => EXIT_NO_RESULT,
        _ => EXIT_FAILED,
    }
}
