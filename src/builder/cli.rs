//! `hearth build`: its arguments and its display (JSON lines, plain lines, or a live status
//! block on a terminal) of what `client.rs` hears. Exit codes: see `client.rs`.

use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::time::Duration;

use super::client::{EXIT_INTERRUPTED, NatsArgs, exit_code, parse_duration, request_build, validate};
use super::job::{HostProgress, HostStatus, Kind, Phase, Reply, Status};

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
    /// Build only if the commit was not built within this long (every host, by any builder),
    /// e.g. `2h`; else answer from the record. For a scheduler on every builder: the fleet
    /// builds once per period.
    #[arg(long, value_parser = parse_duration)]
    pub once_per: Option<Duration>,
}

pub async fn run(args: BuildArgs) -> ExitCode {
    match follow(args).await {
        Ok(code) => ExitCode::from(code),
        Err((code, msg)) => {
            eprintln!("hearth build: {msg}");
            ExitCode::from(code)
        }
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
        (args.timeout, args.once_per),
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

/// `text` wrapped at word boundaries to `width` columns, `first` before its first line and
/// `rest` before the others; words are never split.
fn wrap(text: &str, first: &str, rest: &str, width: usize) -> Vec<String> {
    let options = textwrap::Options::new(width.max(20))
        .initial_indent(first)
        .subsequent_indent(rest)
        .break_words(false)
        .word_splitter(textwrap::WordSplitter::NoHyphenation);
    // A word longer than a line (a store path) starts at the margin: the terminal then breaks
    // it as little as it can, and it is still one line to copy.
    let lines = textwrap::wrap(text, options).into_iter();
    lines.map(|l| if l.chars().count() > width { l.trim_start().to_owned() } else { l.into_owned() }).collect()
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
    let what = match (&reply.host, reply.status, reply.host_status) {
        // A host's result, in the reply's own fields.
        (Some(host), Status::Progress, Some(result)) => format!("[{host}] {}", result.as_str()),
        // Final replies name the request, not one host.
        (Some(host), Status::Progress, None) => format!("[{host}] {message}"),
        _ => message.to_owned(),
    };
    if status.is_empty() { what } else { format!("{status}: {what}") }
}

impl Display {
    pub fn new(json: bool) -> Self {
        Self { json, tty: std::io::stdout().is_terminal(), status_lines: 0, phases: HashMap::new() }
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
        if reply.kind == Some(Kind::Heartbeat) && self.tty {
            if self.status_lines <= 1 {
                let _ = write!(out, "\r\x1b[2K{}", fit(&headline(reply), terminal_width().saturating_sub(1)));
                self.status_lines = 1;
            }
            let _ = out.flush();
            return;
        }
        if !reply.log.is_empty() {
            if self.tty {
                // On a terminal, log lines replace each other on one status line.
                let last = reply.log.last().map_or("", String::as_str);
                self.clear(&mut out);
                let _ =
                    write!(out, "\r\x1b[2K{}", fit(&format!("[{host}] {last}"), terminal_width().saturating_sub(1)));
                self.status_lines = 1;
            } else {
                for line in &reply.log {
                    let _ = writeln!(out, "[{host}] {line}");
                }
            }
            let _ = out.flush();
            return;
        }
        self.clear(&mut out);
        for line in self.wrapped(&headline(reply), "", "  ") {
            let _ = writeln!(out, "{line}");
        }
        for h in reply.hosts.iter().flatten() {
            for line in self.host_lines(h) {
                let _ = writeln!(out, "{line}");
            }
        }
        let _ = out.flush();
    }

    /// A host's part of a final reply: its result, bucket, error and changes.
    fn host_lines(&self, h: &super::job::HostSummary) -> Vec<String> {
        let mark = match h.status {
            HostStatus::Success => "ok  ",
            HostStatus::Unchanged => "same",
            HostStatus::Failure => "FAIL",
            HostStatus::Interrupted => "cut ",
        };
        let out_path = h.out_path.as_deref().unwrap_or("");
        let mut lines =
            self.wrapped(&format!("{mark} {} ({:.0}s) {out_path}", h.host, h.duration_seconds), "  ", "       ");
        if let Some(u) = &h.uploaded {
            let failed = if u.failed > 0 { format!(", {} not queued (queue full)", u.failed) } else { String::new() };
            let text =
                format!("bucket: {} of {} paths there, {} queued for upload{failed}", u.present, u.total, u.queued);
            lines.extend(self.wrapped(&text, "       ", "         "));
        }
        for line in h.error.iter().flat_map(|e| e.lines()) {
            lines.extend(self.wrapped(line, "       ", "         "));
        }
        if let Some(c) = &h.changes {
            lines.extend(self.wrapped(&format!("{}: {}", h.host, c.headline()), "       ", "         "));
            for line in c.lines() {
                lines.extend(self.wrapped(&line, "         ", "           ").into_iter().map(|l| self.colour(&l)));
            }
        }
        lines
    }

    /// `text` after `first` (its first line's indent), on a terminal wrapped at word
    /// boundaries to its width with `rest` before each further line (a word longer than a line,
    /// a store path, stays whole on a line of its own); elsewhere one line.
    fn wrapped(&self, text: &str, first: &str, rest: &str) -> Vec<String> {
        if !self.tty {
            return vec![format!("{first}{text}")];
        }
        wrap(text, first, rest, terminal_width().saturating_sub(1))
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
            // A host's end is its own `host_done` line: printed once, not here too.
            let ended = |p: &HostProgress| matches!(p.phase, Phase::Done | Phase::Unchanged | Phase::Failed);
            for p in progress.iter().filter(|p| !ended(p)) {
                if self.phases.get(&p.host) != Some(&p.phase) {
                    self.phases.insert(p.host.clone(), p.phase);
                    let _ = writeln!(out, "[{}] {}", p.host, progress_line(p));
                }
            }
            // Build log lines, each after its derivation's name (`name> line`).
            for line in &reply.log {
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
        if let Some(last) = reply.log.last() {
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
        let mut r = Reply::progress(Kind::HostDone, "fleet", "all").message("web1: success");
        r.host = Some("web1".into());
        r.host_status = Some(HostStatus::Success);
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
    fn final_lines_wrap_at_word_boundaries_and_keep_store_paths_whole() {
        let path = "/nix/store/4924di507lk0s315v70am3a9rf7nb5mq-nixos-system-web1-25.05.20250101.abcdef0";
        let lines = wrap(&format!("ok   web1 (12s) {path}"), "  ", "       ", 80);
        assert_eq!(lines, ["  ok   web1 (12s)".to_owned(), path.to_owned()]);
        let short = "/nix/store/4924di507lk0s315v70am3a9rf7nb5mq-nixos-system-web1";
        assert_eq!(wrap(&format!("ok   web1 (12s) {short}"), "  ", "       ", 70)[1], format!("       {short}"));
        let text =
            "error: builder for '/nix/store/x.drv' failed with exit code 1; the last lines of its log follow here";
        let lines = wrap(text, "", "  ", 40);
        assert!(lines.iter().all(|l| l.chars().count() <= 40), "{lines:?}");
        assert_eq!(lines.join(" ").split_whitespace().collect::<Vec<_>>(), text.split_whitespace().collect::<Vec<_>>());
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
