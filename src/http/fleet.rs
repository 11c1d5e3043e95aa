//! `GET /` and `GET /fleet.json`: the fleet page. Per repo and host: the last build's status and
//! time, the newest good generation, its closure size and what changed against the one before;
//! with no builder, the cache's own facts. Server-rendered HTML (no scripts, readable on a
//! phone, every value escaped), or the same data as JSON (`/fleet.json`, or `/` with
//! `Accept: application/json`). Nothing secret is shown: no keys, credentials or log lines.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, header};
use axum::response::{Html, IntoResponse, Response};
use serde_json::{Value, json};

use super::AppState;
use crate::fleet::{HostRecord, Hosts};
use crate::nix::closure_diff::{Changes, human_bytes, show_versions as versions};

/// The page's data: the cache's facts and every host's record.
fn data(state: &AppState) -> Value {
    let hosts: Vec<Value> = state
        .fleet
        .snapshot()
        .into_iter()
        .map(|((repo, host), record)| {
            let mut v = serde_json::to_value(&record).unwrap_or_default();
            v["repo"] = repo.into();
            v["host"] = host.into();
            v
        })
        .collect();
    json!({
        "cache": {
            "store_dir": state.store.store_dir(),
            "priority": state.cache.priority,
            "public_keys": state.keys.iter().map(|k| k.name().to_owned()).collect::<Vec<_>>(),
            "compression": if state.cache.zstd_level.is_some() { "zstd" } else { "none" },
        },
        "hosts": hosts,
    })
}

/// The page and its JSON as rendered for one version of the record: rendered once per change,
/// on a blocking thread, never on the threads that answer narinfos.
pub(crate) struct PageCache {
    rendered: tokio::sync::Mutex<Option<Rendered>>,
}

#[derive(Clone)]
struct Rendered {
    version: u64,
    html: Bytes,
    json: Bytes,
}

impl PageCache {
    pub(crate) fn new() -> Self {
        Self { rendered: tokio::sync::Mutex::new(None) }
    }
}

/// The current page, rendering it if the record changed since it was last rendered. One
/// render at a time: concurrent requests wait for it and share it.
async fn current(state: &AppState) -> Option<Rendered> {
    let mut slot = state.page.rendered.lock().await;
    let version = state.fleet.version();
    if let Some(r) = slot.as_ref().filter(|r| r.version == version) {
        return Some(r.clone());
    }
    let owned = state.clone();
    let rendered = tokio::task::spawn_blocking(move || {
        let data = data(&owned);
        let html = render(&owned.fleet.snapshot(), &data["cache"]);
        Rendered { version, html: Bytes::from(html), json: Bytes::from(data.to_string()) }
    })
    .await
    .ok()?;
    *slot = Some(rendered.clone());
    Some(rendered)
}

pub(super) async fn json(State(state): State<AppState>) -> Response {
    let Some(page) = current(&state).await else {
        return super::error::HttpError::Busy("the fleet page could not be rendered").into_response();
    };
    ([(header::CACHE_CONTROL, "no-store"), (header::CONTENT_TYPE, "application/json")], page.json).into_response()
}

pub(super) async fn index(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let wants_json = headers
        .get_all(header::ACCEPT)
        .iter()
        .any(|v| v.to_str().is_ok_and(|v| v.contains("application/json") && !v.contains("text/html")));
    if wants_json {
        return json(State(state)).await;
    }
    let Some(page) = current(&state).await else {
        return super::error::HttpError::Busy("the fleet page could not be rendered").into_response();
    };
    ([(header::CACHE_CONTROL, "no-store")], Html(page.html)).into_response()
}

/// Escapes text for HTML element content and attribute values.
pub(crate) fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A store path's name, without the store directory and hash.
fn short(path: &str) -> &str {
    let base = path.rsplit('/').next().unwrap_or(path);
    base.split_once('-').map_or(base, |(_, name)| name)
}

fn changes_html(c: &Changes) -> String {
    if c.first_build {
        return "<p class=muted>first recorded build: nothing to compare with</p>".into();
    }
    if c.is_empty() && c.bytes_delta() == 0 {
        return "<p class=muted>no change from the previous generation</p>".into();
    }
    let mut out = format!(
        "<p>{} upgraded or downgraded, {} added, {} removed, {} rebuilt; {} ({} → {} paths)</p><ul>",
        c.changed.len(),
        c.added.len(),
        c.removed.len(),
        c.rebuilt,
        esc(&human_bytes(c.bytes_delta(), true)),
        c.paths_before,
        c.paths_after
    );
    for v in &c.changed {
        out.push_str(&format!(
            "<li><b>{}</b> {} → {} <span class=muted>{}</span></li>",
            esc(&v.name),
            esc(&versions(&v.old)),
            esc(&versions(&v.new)),
            esc(&human_bytes(v.size_delta, true))
        ));
    }
    for p in &c.added {
        out.push_str(&format!("<li class=add>+ <b>{}</b> {}</li>", esc(&p.name), esc(&versions(&p.versions))));
    }
    for p in &c.removed {
        out.push_str(&format!("<li class=del>− <b>{}</b> {}</li>", esc(&p.name), esc(&versions(&p.versions))));
    }
    if c.truncated > 0 {
        out.push_str(&format!("<li class=muted>… and {} more</li>", c.truncated));
    }
    out.push_str("</ul>");
    out
}

fn host_html(repo: &str, host: &str, r: &HostRecord) -> String {
    let (status, class) = match r.last_build.as_ref().map(|b| b.status.as_str()) {
        Some("success") => ("built", "ok"),
        Some(_) => ("FAILED", "bad"),
        None if !r.branches.is_empty() => ("no build of the deploy branch yet", "muted"),
        None => ("no build since start", "muted"),
    };
    let when = r
        .last_build
        .as_ref()
        .map(|b| {
            let commit = b
                .commit
                .as_deref()
                .map(|c| format!(" at {}", c.chars().take(12).collect::<String>()))
                .unwrap_or_default();
            format!("{}{}", crate::utc::minute(b.at), commit)
        })
        .unwrap_or_default();
    let mut out = format!(
        "<section><h3>{} <span class=\"{class}\">{}</span></h3><p class=muted>{} · {}</p>",
        esc(host),
        esc(status),
        esc(repo),
        esc(&when)
    );
    if let Some(g) = r.generations.last() {
        out.push_str(&format!(
            "<p>generation {} · {} · built {}{}</p>",
            g.number,
            esc(short(&g.path)),
            esc(&crate::utc::minute(g.built_at)),
            r.closure_bytes
                .map(|b| format!(
                    " · closure {} in {} paths",
                    esc(&human_bytes(b as i64, false)),
                    r.closure_paths.unwrap_or(0)
                ))
                .unwrap_or_default()
        ));
        if r.generations.len() > 1 {
            out.push_str(&format!(
                "<p class=muted>{} older generation(s) kept for rollback</p>",
                r.generations.len() - 1
            ));
        }
    }
    if let Some(c) = &r.changes {
        out.push_str(&changes_html(c));
    }
    // Other branches' builds: shown under their branch, never as the host's state.
    for (branch, b) in &r.branches {
        let (word, class) = if b.build.status == "success" { ("built", "ok") } else { ("failed", "bad") };
        out.push_str(&format!(
            "<p class=muted>branch <code>{}</code>: <span class=\"{class}\">{word}</span> {}{}</p>",
            esc(branch),
            esc(&crate::utc::minute(b.build.at)),
            b.out_path.as_deref().map(|p| format!(" · {}", esc(short(p)))).unwrap_or_default()
        ));
    }
    out.push_str("</section>");
    out
}

const STYLE: &str = "body{font:16px/1.45 system-ui,sans-serif;margin:0 auto;max-width:52rem;padding:1rem;color:#222}\
h1{font-size:1.4rem}h2{font-size:1.15rem;border-bottom:1px solid #ddd;margin-top:1.5rem}\
h3{font-size:1rem;margin:.2rem 0}section{padding:.6rem 0;border-bottom:1px solid #eee;overflow-wrap:anywhere}\
p{margin:.2rem 0}ul{margin:.2rem 0;padding-left:1.2rem}.ok{color:#17702a}.bad{color:#b00020}\
.muted{color:#666}.add{color:#17702a}.del{color:#b00020}code{font-size:.9em}\
@media (prefers-color-scheme:dark){body{background:#111;color:#ddd}.muted{color:#999}}";

/// Hosts the HTML page shows at most (the rest are in `/fleet.json`), so that one page stays a
/// page: about 1 KiB of HTML each.
const MAX_PAGE_HOSTS: usize = 500;

fn render(hosts: &Hosts, cache: &Value) -> String {
    let mut body = String::new();
    let keys: Vec<&str> = cache["public_keys"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
    body.push_str(&format!(
        "<h1>hearth</h1><p class=muted>binary cache of <code>{}</code> · priority {} · {} · {}</p>",
        esc(cache["store_dir"].as_str().unwrap_or("")),
        cache["priority"],
        esc(&format!("compression {}", cache["compression"].as_str().unwrap_or("none"))),
        if keys.is_empty() {
            "unsigned (no signing key)".to_owned()
        } else {
            format!("signed by {}", esc(&keys.join(", ")))
        }
    ));
    if hosts.is_empty() {
        body.push_str("<p>No builds are recorded here: this cache runs no builder, or none has built yet.</p>");
    }
    let mut repo_shown = None;
    for ((repo, host), record) in hosts.iter().take(MAX_PAGE_HOSTS) {
        if repo_shown != Some(repo) {
            body.push_str(&format!("<h2>{}</h2>", esc(repo)));
            repo_shown = Some(repo);
        }
        body.push_str(&host_html(repo, host, record));
    }
    if hosts.len() > MAX_PAGE_HOSTS {
        body.push_str(&format!(
            "<p class=muted>{} more hosts are not shown here; <a href=\"/fleet.json\">fleet.json</a> has them all.</p>",
            hosts.len() - MAX_PAGE_HOSTS
        ));
    }
    format!(
        "<!doctype html><html lang=en><head><meta charset=utf-8>\
         <meta name=viewport content=\"width=device-width,initial-scale=1\"><title>hearth · fleet</title>\
         <style>{STYLE}</style></head><body>{body}<p class=muted><a href=\"/fleet.json\">fleet.json</a></p></body></html>"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::{Generation, LastBuild};
    use crate::nix::closure_diff::VersionChange;

    #[test]
    fn everything_shown_is_escaped() {
        let mut hosts = Hosts::new();
        let record = HostRecord {
            last_build: Some(LastBuild::new("failure", 0, Some("a".repeat(40)))),
            generations: vec![Generation { number: 2, path: "/nix/store/x-<b>".into(), built_at: 0, commit: None }],
            closure_bytes: Some(1 << 30),
            closure_paths: Some(3),
            changes: Some(Changes {
                changed: vec![VersionChange {
                    name: "<script>".into(),
                    old: vec!["1".into()],
                    new: vec!["2".into()],
                    size_delta: 5,
                }],
                ..Changes::default()
            }),
            branches: [(
                "<exp>".to_owned(),
                crate::fleet::BranchBuild {
                    build: LastBuild::new("failure", 0, None),
                    out_path: Some("/nix/store/y-<i>".into()),
                },
            )]
            .into(),
        };
        hosts.insert(("r&d".into(), "web\"1".into()), record);
        let page = render(&hosts, &json!({"store_dir": "/nix/store", "priority": 30, "public_keys": []}));
        assert!(!page.contains("<script>") && page.contains("&lt;script&gt;"));
        assert!(page.contains("r&amp;d") && page.contains("web&quot;1") && page.contains("generation 2 · &lt;b&gt;"));
        assert!(page.contains("1.0 GiB") && page.contains("FAILED"));
        assert!(page.contains("branch <code>&lt;exp&gt;</code>") && page.contains("&lt;i&gt;"), "{page}");
    }

    #[test]
    fn a_page_shows_a_bounded_number_of_hosts_and_says_so() {
        let mut hosts = Hosts::new();
        for i in 0..2000 {
            let record = HostRecord {
                last_build: Some(LastBuild::new("success", 0, Some("c".repeat(40)))),
                ..HostRecord::default()
            };
            hosts.insert(("fleet".into(), format!("host{i:04}")), record);
        }
        let page = render(&hosts, &json!({"store_dir": "/nix/store", "priority": 30, "public_keys": []}));
        assert!(page.contains("host0499") && !page.contains("host0500"));
        assert!(page.contains("1500 more hosts are not shown here"));
        assert!(page.len() < MAX_PAGE_HOSTS * 2048, "{} bytes", page.len());
    }

    #[test]
    fn a_commit_with_multi_byte_characters_renders() {
        // A hand-edited or damaged record: the 12th byte is inside a character.
        let mut hosts = Hosts::new();
        let commit = format!("{}é{}", "a".repeat(11), "b".repeat(10));
        let record =
            HostRecord { last_build: Some(LastBuild::new("success", 0, Some(commit))), ..HostRecord::default() };
        hosts.insert(("r".into(), "h".into()), record);
        let page = render(&hosts, &json!({"store_dir": "/nix/store", "priority": 30, "public_keys": []}));
        assert!(page.contains(&format!(" at {}é", "a".repeat(11))), "{page}");
    }

    #[test]
    fn versions_read_as_diff_closures_prints_them() {
        assert_eq!(versions(&["".into(), "1.2".into()]), "ε, 1.2");
    }
}
