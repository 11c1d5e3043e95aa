//! `hearth build`: publish a build request over NATS and follow its replies to the end.
//!
//! Exit codes: 0 every host built; 1 the build failed; 2 the request was refused (bad arguments,
//! rejected, or no builder serves the repo); 3 no final reply (timeout or NATS unreachable).
//! Success is judged from the final reply only.

use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use futures::StreamExt;

use super::config::NatsAuth;
use super::job::{self, BuildRequest, HostProgress, HostStatus, Phase, Reply, Status};

#[derive(Debug, clap::Args)]
#[command(after_help = "Exit codes: 0 every host built; 1 a host failed; 2 refused (bad arguments, rejected, \
credentials that may not publish, no builder serves the repo); 3 no result (interrupted, timeout, NATS \
unreachable); 130 interrupted here with Ctrl-C (the build goes on).")]
pub struct BuildArgs {
    /// The repo, as configured on the builder.
    pub repo: String,
    /// A host name, or `all`.
    pub target: String,
    /// The branch to build (default: the repo's configured branch).
    #[arg(long)]
    pub branch: Option<String>,
    /// Build exactly this commit (its id, or an abbreviation of 7+ hex digits that is unique)
    /// instead of the branch's current one.
    #[arg(long)]
    pub rev: Option<String>,
    #[command(flatten)]
    pub nats: NatsArgs,
    /// How long to wait for the final reply, e.g. `4h`, `30m`, `90s` or seconds.
    #[arg(long, default_value = "5h", value_parser = parse_duration)]
    pub timeout: Duration,
    /// Print every reply as a JSON line.
    #[arg(long)]
    pub json: bool,
}

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

pub async fn run(args: BuildArgs) -> ExitCode {
    match follow(args).await {
        Ok(code) => ExitCode::from(code),
        Err((code, msg)) => {
            eprintln!("hearth build: {msg}");
            ExitCode::from(code)
        }
    }
}

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
    timeout: Duration,
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
    let client = &deployer.client;
    let mut errors = deployer.errors.clone();
    let id = random_id();
    let reply_to = format!("{}{id}", job::RESPONSE_PREFIX);
    let mut sub = client.subscribe(reply_to.clone()).await.map_err(|e| (EXIT_NO_RESULT, format!("subscribe: {e}")))?;
    request.reply_to = Some(reply_to.clone());
    let payload = serde_json::to_vec(&request).map_err(|e| (EXIT_REFUSED, e.to_string()))?;
    let repo = &request.repo;
    // The reply subject lets the server answer "no responders" when no builder serves the repo,
    // and a JetStream stream that captures the request answer with its place in the stream.
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(job::REQUESTED_BY_HEADER, deployer.requested_by.as_str());
    // A publish retried (by the client library, or a flake-update run again) is one request.
    headers.insert("Nats-Msg-Id", id.as_str());
    client
        .publish_with_reply_and_headers(format!("build.{repo}.{}", request.target), reply_to, headers, payload.into())
        .await
        .map_err(|e| (EXIT_NO_RESULT, format!("publish: {e}")))?;
    client.flush().await.map_err(|e| (EXIT_NO_RESULT, format!("flush: {e}")))?;
    let deadline = tokio::time::Instant::now() + timeout;
    let silence = deployer.silence.max(Duration::from_secs(1));
    // Where JetStream keeps the request: it outlives any builder.
    let mut durable: Option<(String, u64)> = None;
    let mut heard = tokio::time::Instant::now();
    let mut said_waiting = false;
    loop {
        let quiet_until = (heard + silence).min(deadline);
        let next = tokio::select! {
            next = tokio::time::timeout_at(quiet_until, sub.next()) => next,
            Ok(()) = errors.changed() => {
                let error = errors.borrow_and_update().clone().unwrap_or_default();
                if error.to_ascii_lowercase().contains("permissions violation") {
                    return Err((
                        EXIT_REFUSED,
                        format!(
                            "NATS refused this request ({error}): these credentials may not publish to build.{repo}.{} or subscribe to {}>",
                            request.target,
                            job::RESPONSE_PREFIX
                        ),
                    ));
                }
                tracing::warn!(%error, "NATS server error");
                continue;
            }
        };
        let msg = match next {
            Ok(Some(m)) => m,
            Ok(None) => return Err((EXIT_NO_RESULT, "the NATS subscription ended".into())),
            Err(_) if tokio::time::Instant::now() >= deadline => {
                return Err((EXIT_NO_RESULT, format!("no final reply within {timeout:?}")));
            }
            Err(_) => match &durable {
                None => {
                    return Err((
                        EXIT_NO_RESULT,
                        format!(
                            "the builder went silent: no reply for {}s (it may have stopped or lost NATS); the request is gone with it: send it again",
                            silence.as_secs()
                        ),
                    ));
                }
                Some((stream, seq)) => {
                    // Not lost: the stream keeps it until a builder has answered it.
                    heard = tokio::time::Instant::now();
                    if !said_waiting {
                        let note = Reply::new(Status::Progress, repo, &request.target).message(format!(
                            "no reply for {}s: the request waits in JetStream stream {stream} (#{seq}); a free builder takes it, or it is delivered again if its builder stopped",
                            silence.as_secs()
                        ));
                        let raw = serde_json::to_vec(&note).unwrap_or_default();
                        on_reply(&note, &raw);
                        said_waiting = true;
                    }
                    continue;
                }
            },
        };
        heard = tokio::time::Instant::now();
        if msg.status == Some(async_nats::StatusCode::NO_RESPONDERS) {
            return Err((EXIT_REFUSED, format!("no builder serves repo `{repo}`")));
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
                    durable = Some((stream, seq));
                    continue;
                }
                _ => {}
            }
        }
        let Ok(reply) = serde_json::from_slice::<Reply>(&msg.payload) else {
            tracing::warn!("ignoring a reply that is not a build reply");
            continue;
        };
        said_waiting = false;
        on_reply(&reply, &msg.payload);
        if reply.status.is_final() {
            return Ok(reply);
        }
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

async fn follow(args: BuildArgs) -> Result<u8, (u8, String)> {
    validate(&args.repo, &args.target, args.branch.as_deref())?;
    let client = args.nats.connect("hearth-build-cli").await?;
    let mut display = Display::new(args.json);
    let build = request_build(
        &client,
        &args.repo,
        &args.target,
        args.branch.as_deref(),
        args.rev.as_deref(),
        args.timeout,
        |r, raw| display.show(r, raw),
    );
    tokio::select! {
        reply = build => Ok(exit_code(&reply?)),
        _ = tokio::signal::ctrl_c() => {
            if std::io::stdout().is_terminal() {
                // End the status line before the message.
                println!();
            }
            let again = format!("hearth build {} {}", args.repo, args.target);
            Err((
                EXIT_INTERRUPTED,
                format!("interrupted: the build goes on on the builder; `{again}` follows it again (it joins the running build)"),
            ))
        }
    }
}

/// Renders replies: JSON lines, plain lines, or a live status block on a terminal.
pub struct Display {
    json: bool,
    tty: bool,
    /// Lines of the status block on screen (to be redrawn or cleared before the next line).
    status_lines: usize,
    /// Each host's phase as last printed (plain output prints changes only).
    phases: HashMap<String, Phase>,
}

/// The terminal's size (columns, rows), read on every update so a resize takes effect at once.
fn terminal_size() -> (usize, usize) {
    rustix::termios::tcgetwinsize(std::io::stdout())
        .map(|w| (usize::from(w.ws_col), usize::from(w.ws_row)))
        .ok()
        .filter(|&(w, h)| w > 0 && h > 0)
        .unwrap_or((80, 24))
}

fn terminal_width() -> usize {
    terminal_size().0
}

/// One host's progress in words: `building 3 of 7: dep-a, nginx`.
pub fn progress_line(p: &HostProgress) -> String {
    match p.phase {
        Phase::Evaluating => "evaluating".to_owned(),
        Phase::Evaluated => format!("evaluated, {} to build", p.to_build),
        Phase::Waiting => format!("waiting, {} of {} built", p.built, p.to_build),
        Phase::Building => format!("building {} of {}: {}", p.built + 1, p.to_build, p.building.join(", ")),
        Phase::Done => format!("done, {} built", p.to_build),
        Phase::Failed => "FAILED".to_owned(),
        Phase::Unchanged => "unchanged".to_owned(),
    }
}

/// The whole build in one line: `12 of 16 hosts done · 2 building · 1 failed`.
pub fn progress_summary(progress: &[HostProgress]) -> String {
    let count = |phases: &[Phase]| progress.iter().filter(|p| phases.contains(&p.phase)).count();
    let done = count(&[Phase::Done, Phase::Unchanged]);
    let mut parts = vec![format!("{done} of {} host(s) done", progress.len())];
    for (n, what) in [
        (count(&[Phase::Evaluating]), "evaluating"),
        (count(&[Phase::Building]), "building"),
        (count(&[Phase::Waiting, Phase::Evaluated]), "waiting"),
        (count(&[Phase::Failed]), "failed"),
        (count(&[Phase::Unchanged]), "unchanged"),
    ] {
        if n > 0 {
            parts.push(format!("{n} {what}"));
        }
    }
    parts.join(" · ")
}

/// The hosts to show in `rows` lines: the ones at work and the failed ones first.
fn shown(progress: &[HostProgress], rows: usize) -> (Vec<&HostProgress>, usize) {
    let rank = |p: &HostProgress| match p.phase {
        Phase::Building => 0,
        Phase::Failed => 1,
        Phase::Evaluating => 2,
        Phase::Waiting | Phase::Evaluated => 3,
        Phase::Done | Phase::Unchanged => 4,
    };
    let mut order: Vec<&HostProgress> = progress.iter().collect();
    if order.len() > rows {
        order.sort_by_key(|p| rank(p));
        let hidden = order.len() - rows.saturating_sub(1);
        order.truncate(rows.saturating_sub(1));
        return (order, hidden);
    }
    (order, 0)
}

/// `text` cut to `width` columns (characters), never wrapping.
fn fit(text: &str, width: usize) -> String {
    let mut out: String = text.chars().filter(|c| !c.is_control()).take(width).collect();
    if text.chars().count() > width && width > 1 {
        out.pop();
        out.push('…');
    }
    out
}

/// How a reply reads in one line, without its log lines: `[host] message`, or the message.
pub fn headline(reply: &Reply) -> String {
    let message = reply.message.as_deref().unwrap_or("");
    let status = match reply.status {
        Status::Started => "started",
        Status::Progress => "",
        Status::Completed => "completed",
        Status::Failed => "FAILED",
        Status::Rejected => "rejected",
        Status::Interrupted => "interrupted",
    };
    let what = match (&reply.host, reply.status) {
        // Final replies name the request, not one host.
        (Some(host), Status::Progress) => {
            let message = message.strip_prefix(host.as_str()).and_then(|m| m.strip_prefix(": ")).unwrap_or(message);
            format!("[{host}] {message}")
        }
        _ => message.to_owned(),
    };
    if status.is_empty() { what } else { format!("{status}: {what}") }
}

impl Display {
    pub fn new(json: bool) -> Self {
        Self { json, tty: std::io::stdout().is_terminal(), status_lines: 0, phases: HashMap::new() }
    }

    /// Whether a reply carries build log lines (rather than an event).
    fn is_log(reply: &Reply) -> bool {
        reply.status == Status::Progress
            && reply.host.is_some()
            && reply.out_path.is_none()
            && reply.duration_seconds.is_none()
            && reply.queue_position.is_none()
            && reply.message.as_deref() != reply.host.as_deref().map(|h| format!("building {h}")).as_deref()
    }

    pub fn show(&mut self, reply: &Reply, raw: &[u8]) {
        let mut out = std::io::stdout().lock();
        if self.json {
            let _ = out.write_all(raw);
            let _ = out.write_all(b"\n");
            return;
        }
        let host = reply.host.as_deref().unwrap_or("");
        if let (Some(progress), Status::Progress) = (&reply.progress, reply.status) {
            self.show_progress(&mut out, reply, progress);
            return;
        }
        // A heartbeat ("still building (40s)"): on a terminal it only replaces a status line,
        // never scrolls the screen, and leaves a progress block as it is.
        let heartbeat = reply.status == Status::Progress
            && reply.host.is_none()
            && reply.message.as_deref().is_some_and(|m| m.starts_with("still building"));
        if heartbeat && self.tty {
            if self.status_lines <= 1 {
                let _ = write!(out, "\r\x1b[2K{}", fit(&headline(reply), terminal_width().saturating_sub(1)));
                self.status_lines = 1;
            }
            let _ = out.flush();
            return;
        }
        if Self::is_log(reply) {
            if self.tty {
                // On a terminal, log lines replace each other on one status line.
                let last = reply.message.as_deref().unwrap_or("").lines().last().unwrap_or("");
                self.clear(&mut out);
                let _ =
                    write!(out, "\r\x1b[2K{}", fit(&format!("[{host}] {last}"), terminal_width().saturating_sub(1)));
                self.status_lines = 1;
            } else {
                for line in reply.message.as_deref().unwrap_or("").lines() {
                    let _ = writeln!(out, "[{host}] {line}");
                }
            }
            let _ = out.flush();
            return;
        }
        self.clear(&mut out);
        let _ = writeln!(out, "{}", headline(reply));
        if let Some(hosts) = &reply.hosts {
            for h in hosts {
                let mark = match h.status {
                    HostStatus::Success => "ok  ",
                    HostStatus::Unchanged => "same",
                    HostStatus::Failure => "FAIL",
                    HostStatus::Interrupted => "cut ",
                };
                let _ = writeln!(
                    out,
                    "  {mark} {} ({:.0}s) {}",
                    h.host,
                    h.duration_seconds,
                    h.out_path.as_deref().unwrap_or("")
                );
                if let Some(u) = &h.uploaded {
                    let failed =
                        if u.failed > 0 { format!(", {} not queued (queue full)", u.failed) } else { String::new() };
                    let _ = writeln!(
                        out,
                        "       bucket: {} of {} paths there, {} queued for upload{failed}",
                        u.present, u.total, u.queued
                    );
                }
                if let Some(err) = &h.error {
                    for line in err.lines() {
                        let _ = writeln!(out, "       {line}");
                    }
                }
                if let Some(c) = &h.changes {
                    let _ = writeln!(out, "       {}: {}", h.host, c.headline());
                    for line in c.lines() {
                        let _ = writeln!(out, "         {}", self.colour(&line));
                    }
                }
            }
        }
        let _ = out.flush();
    }

    /// Removes the status block (or line) from the screen, the cursor at its first line.
    fn clear(&mut self, out: &mut impl Write) {
        match self.status_lines {
            0 => {}
            1 => {
                let _ = write!(out, "\r\x1b[2K");
            }
            n => {
                let _ = write!(out, "\r\x1b[{}A\x1b[J", n - 1);
            }
        }
        self.status_lines = 0;
    }

    /// A progress reply: on a terminal, a block redrawn in place (one line a host, then the
    /// summary and the newest log line); otherwise a line each time a host's phase changes.
    fn show_progress(&mut self, out: &mut impl Write, reply: &Reply, progress: &[HostProgress]) {
        if !self.tty {
            for p in progress {
                if self.phases.get(&p.host) != Some(&p.phase) {
                    self.phases.insert(p.host.clone(), p.phase);
                    let _ = writeln!(out, "[{}] {}", p.host, progress_line(p));
                }
            }
            // Build log lines, each after its derivation's name (`name> line`).
            for line in reply.message.as_deref().unwrap_or("").lines().filter(|l| l.contains("> ")) {
                let _ = writeln!(out, "{line}");
            }
            let _ = out.flush();
            return;
        }
        let (width, rows) = terminal_size();
        let width = width.saturating_sub(1);
        let name_width = progress.iter().map(|p| p.host.chars().count()).max().unwrap_or(0).min(width / 3);
        let (hosts, hidden) = shown(progress, rows.saturating_sub(3).max(2));
        let mut lines: Vec<String> =
            hosts.iter().map(|p| fit(&format!("  {:name_width$}  {}", p.host, progress_line(p)), width)).collect();
        if hidden > 0 {
            lines.push(format!("  … and {hidden} more"));
        }
        lines.push(fit(&progress_summary(progress), width));
        if let Some(last) = reply.message.as_deref().and_then(|m| m.lines().last()).filter(|l| l.contains("> ")) {
            lines.push(fit(last, width));
        }
        self.clear(out);
        let _ = write!(out, "{}", lines.join("\n"));
        self.status_lines = lines.len();
        let _ = out.flush();
    }

    /// Added lines green, removed red, on a terminal only (and never with `NO_COLOR`).
    fn colour(&self, line: &str) -> String {
        let colour = self.tty && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
        match (colour, line.as_bytes().first()) {
            (true, Some(b'+')) => format!("\x1b[32m{line}\x1b[0m"),
            (true, Some(b'-')) => format!("\x1b[31m{line}\x1b[0m"),
            _ => line.to_owned(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_fit_and_read_plainly() {
        assert_eq!(fit("abcdef", 4), "abc…");
        assert_eq!(fit("abc", 4), "abc");
        assert_eq!(fit("a\tb\x1b[31m", 10), "ab[31m");
        let mut r = Reply::new(Status::Progress, "fleet", "all").message("web1: success");
        r.host = Some("web1".into());
        assert_eq!(headline(&r), "[web1] success");
        let started = Reply::new(Status::Started, "fleet", "all").message("building all of fleet at master");
        assert_eq!(headline(&started), "started: building all of fleet at master");
    }

    #[test]
    fn progress_reads_in_one_line_a_host() {
        let p = |host: &str, phase, built, to_build, building: &[&str]| HostProgress {
            host: host.into(),
            phase,
            built,
            to_build,
            building: building.iter().map(|s| s.to_string()).collect(),
        };
        let all = vec![
            p("web1", Phase::Building, 2, 7, &["nginx-1.27", "dep-a"]),
            p("web2", Phase::Done, 3, 3, &[]),
            p("db1", Phase::Failed, 0, 4, &[]),
            p("ns1", Phase::Unchanged, 0, 0, &[]),
            p("ns2", Phase::Evaluating, 0, 0, &[]),
        ];
        assert_eq!(progress_line(&all[0]), "building 3 of 7: nginx-1.27, dep-a");
        assert_eq!(progress_line(&all[1]), "done, 3 built");
        assert_eq!(progress_summary(&all), "2 of 5 host(s) done · 1 evaluating · 1 building · 1 failed · 1 unchanged");
        // Fewer rows than hosts: the busy and failed ones stay, the rest are counted.
        let (hosts, hidden) = shown(&all, 3);
        assert_eq!(hosts.iter().map(|h| h.host.as_str()).collect::<Vec<_>>(), ["web1", "db1"]);
        assert_eq!(hidden, 3);
        assert_eq!(shown(&all, 10).1, 0);
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("30m").unwrap(), Duration::from_secs(1800));
        assert_eq!(parse_duration("4h").unwrap(), Duration::from_secs(14400));
        assert!(parse_duration("4x").is_err());
        assert!(parse_duration("h").is_err());
    }
}
