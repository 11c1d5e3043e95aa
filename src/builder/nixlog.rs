//! Nix's structured log (`--log-format internal-json`): one `@nix {…}` JSON object a line, read
//! into the few events the builder follows (a derivation's build starts, logs a line, stops; an
//! error names derivations).
//!
//! Pure: lines in, events out, no I/O. Activity and result types it does not know (Nix adds
//! some in most releases) and lines that are not `@nix` JSON are passed over or given back as
//! plain text; nothing in a line can make it fail.

use std::collections::HashMap;

use serde::Deserialize;

/// `actBuild` in Nix's `ActivityType`: a derivation being built (`fields[0]` is its path).
const ACT_BUILD: u64 = 105;
/// `resBuildLogLine` in Nix's `ResultType`: a line of a build's output (`fields[0]`).
const RES_BUILD_LOG_LINE: u64 = 101;
/// Nix's `lvlError`: the level of error messages.
const LEVEL_ERROR: u64 = 0;
/// Longest text kept of one line or message; longer ones are cut.
const MAX_TEXT: usize = 2000;

/// What one line of the log says, as far as the builder cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A derivation's build started (`drv`: its store path).
    BuildStarted { drv: String },
    /// A line of a running build's output.
    BuildLine { drv: String, line: String },
    /// A derivation's build ended, well or not (an error message says which).
    BuildStopped { drv: String },
    /// An error message, without colours; `drvs`: the derivation paths it names.
    Error { text: String, drvs: Vec<String> },
    /// A line that is not structured (Nix prints some warnings plainly).
    Text(String),
}

#[derive(Deserialize)]
#[serde(tag = "action", rename_all = "lowercase")]
enum Line {
    Start {
        id: u64,
        #[serde(rename = "type", default)]
        kind: u64,
        #[serde(default)]
        fields: Vec<serde_json::Value>,
    },
    Stop {
        id: u64,
    },
    Result {
        id: u64,
        #[serde(rename = "type", default)]
        kind: u64,
        #[serde(default)]
        fields: Vec<serde_json::Value>,
    },
    Msg {
        #[serde(default)]
        level: u64,
        #[serde(default)]
        msg: String,
    },
}

/// Reads one Nix process's log, line by line; it remembers which activity is which build.
#[derive(Debug, Default)]
pub struct Parser {
    builds: HashMap<u64, String>,
}

impl Parser {
    pub fn new() -> Self {
        Self::default()
    }

    /// The event `line` carries, if any the builder follows.
    pub fn feed(&mut self, line: &str) -> Option<Event> {
        let Some(json) = line.strip_prefix("@nix ") else {
            let text = cut(&strip_colours(line));
            return (!text.trim().is_empty()).then_some(Event::Text(text));
        };
        // Unknown actions and malformed objects are not an error: newer Nix says more.
        let parsed: Line = serde_json::from_str(json).ok()?;
        match parsed {
            Line::Start { id, kind: ACT_BUILD, fields } => {
                let drv = fields.first()?.as_str().filter(|d| d.ends_with(".drv"))?.to_owned();
                self.builds.insert(id, drv.clone());
                Some(Event::BuildStarted { drv })
            }
            Line::Start { .. } => None,
            Line::Stop { id } => self.builds.remove(&id).map(|drv| Event::BuildStopped { drv }),
            Line::Result { id, kind: RES_BUILD_LOG_LINE, fields } => {
                let drv = self.builds.get(&id)?.clone();
                let line = cut(&strip_colours(fields.first()?.as_str()?));
                Some(Event::BuildLine { drv, line })
            }
            Line::Result { .. } => None,
            Line::Msg { level: LEVEL_ERROR, msg } => {
                let text = strip_colours(&msg);
                let drvs = drv_paths(&text);
                Some(Event::Error { text: cut(&text), drvs })
            }
            Line::Msg { .. } => None,
        }
    }
}

/// `text` without ANSI escape sequences (Nix colours its messages even in JSON).
pub fn strip_colours(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '\u{1b}' {
            out.push(c);
            continue;
        }
        // CSI: ESC [ parameters… final byte (@ to ~).
        if chars.peek() == Some(&'[') {
            chars.next();
            for c in chars.by_ref() {
                if ('@'..='~').contains(&c) {
                    break;
                }
            }
        }
    }
    out
}

fn cut(text: &str) -> String {
    match text.char_indices().nth(MAX_TEXT) {
        Some((at, _)) => text[..at].to_owned(),
        None => text.to_owned(),
    }
}

/// The store paths ending in `.drv` that `text` names (quoted or not), in order, once each.
fn drv_paths(text: &str) -> Vec<String> {
    let mut found: Vec<String> = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find("/nix/store/") {
        let tail = &rest[at..];
        let end = tail.find(|c: char| !(c.is_ascii_alphanumeric() || "/+-._?=".contains(c))).unwrap_or(tail.len());
        let path = tail[..end].trim_end_matches('.');
        if let Some(drv) = path.strip_suffix(".drv").map(|p| format!("{p}.drv"))
            && !found.contains(&drv)
        {
            found.push(drv);
        }
        rest = &tail[end.max(1)..];
    }
    found
}

/// The name of a derivation path without its hash and `.drv`: `/nix/store/<hash>-dep-a.drv` is
/// `dep-a`.
pub fn drv_name(drv: &str) -> &str {
    let base = drv.rsplit('/').next().unwrap_or(drv);
    let base = base.strip_suffix(".drv").unwrap_or(base);
    base.split_once('-').map_or(base, |(_, name)| name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_lines_and_errors_are_read() {
        let mut p = Parser::new();
        let start = r#"@nix {"action":"start","fields":["/nix/store/aaaa-bad.drv","",1,1],"id":7,"level":3,"parent":0,"text":"building","type":105}"#;
        assert_eq!(p.feed(start), Some(Event::BuildStarted { drv: "/nix/store/aaaa-bad.drv".into() }));
        let line = r#"@nix {"action":"result","fields":["fail\u001b[31ming"],"id":7,"type":101}"#;
        assert_eq!(
            p.feed(line),
            Some(Event::BuildLine { drv: "/nix/store/aaaa-bad.drv".into(), line: "failing".into() })
        );
        let err = r#"@nix {"action":"msg","level":0,"msg":"\u001b[31;1merror:\u001b[0m builder for '\u001b[35;1m/nix/store/aaaa-bad.drv\u001b[0m' failed"}"#;
        assert_eq!(
            p.feed(err),
            Some(Event::Error {
                text: "error: builder for '/nix/store/aaaa-bad.drv' failed".into(),
                drvs: vec!["/nix/store/aaaa-bad.drv".into()]
            })
        );
        assert_eq!(
            p.feed(r#"@nix {"action":"stop","id":7}"#),
            Some(Event::BuildStopped { drv: "/nix/store/aaaa-bad.drv".into() })
        );
        // Stopped once: a second stop of the same activity is nothing.
        assert_eq!(p.feed(r#"@nix {"action":"stop","id":7}"#), None);
    }

    #[test]
    fn what_it_does_not_know_is_passed_over() {
        let mut p = Parser::new();
        for line in [
            // Activity and result types of newer Nix, actions that do not exist, bad JSON.
            r#"@nix {"action":"start","id":1,"type":112,"fields":[1,2],"text":"x"}"#,
            r#"@nix {"action":"result","id":1,"type":108,"fields":[{"a":1}]}"#,
            r#"@nix {"action":"result","id":99,"type":101,"fields":["a line of no known build"]}"#,
            r#"@nix {"action":"setPhase","id":1}"#,
            r#"@nix {"action":"msg","level":3,"msg":"these 5 derivations will be built:"}"#,
            r#"@nix {"action":"start","id":2,"type":105,"fields":[7]}"#,
            r#"@nix {"action":"start","id":3,"type":105}"#,
            r#"@nix {"action":"stop","id":1}"#,
            "@nix {not json",
            "@nix ",
            "",
        ] {
            assert_eq!(p.feed(line), None, "{line}");
        }
        assert_eq!(p.feed("warning: plain\u{1b}[0m"), Some(Event::Text("warning: plain".into())));
    }

    #[test]
    fn names_and_paths() {
        assert_eq!(drv_name("/nix/store/0qmwlny41nap6ccq7xi471zj6m58b530-dep-a.drv"), "dep-a");
        assert_eq!(drv_name("weird"), "weird");
        let text = "Cannot build /nix/store/aa-b.drv.\n  Output paths:\n    /nix/store/aa-b\n /nix/store/cc-d.drv^out /nix/store/aa-b.drv";
        assert_eq!(drv_paths(text), ["/nix/store/aa-b.drv", "/nix/store/cc-d.drv"]);
        assert_eq!(strip_colours("\u{1b}[35;1mx\u{1b}[0m\u{1b}"), "x");
        let long = "é".repeat(MAX_TEXT + 5);
        assert_eq!(cut(&long).chars().count(), MAX_TEXT);
    }
}
