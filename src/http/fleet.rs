//! `GET /` and `GET /fleet.json`: the fleet page. Per repo and host: the last build's status and
//! time, the newest good generation, its closure size and what changed against the one before;
//! with no builder, the cache's own facts. Server-rendered HTML (no scripts, readable on a
//! phone, every value escaped), or the same data as JSON (`/fleet.json`, or `/` with
//! `Accept: application/json`). Nothing secret is shown: no keys, credentials or log lines.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, header};
use axum::response::{Html, IntoResponse, Response};
use serde_json::{Value, json};

use super::AppState;
use crate::fleet::{Activity, HostRecord, Hosts};
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
            "trusted_public_keys": state.keys.iter().map(|k| k.public_key().to_string()).collect::<Vec<_>>(),
            "compression": if state.cache.zstd_level.is_some() { "zstd" } else { "none" },
        },
        "builder": state.fleet.has_builder(),
        "activity": state.fleet.activity(),
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
    /// When it was rendered: relative times ("5 min ago") are redone after [`PAGE_FRESH`].
    at: std::time::Instant,
    html: Arc<String>,
    json: Bytes,
    public_keys: Arc<Vec<String>>,
}

/// How long a rendered page's relative times are taken as still true.
const PAGE_FRESH: std::time::Duration = std::time::Duration::from_secs(30);

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
    if let Some(r) = slot.as_ref().filter(|r| r.version == version && r.at.elapsed() < PAGE_FRESH) {
        return Some(r.clone());
    }
    let owned = state.clone();
    let rendered = tokio::task::spawn_blocking(move || {
        let data = data(&owned);
        let activity = owned.fleet.activity();
        let facts = Facts {
            cache: &data["cache"],
            activity: &activity,
            now: crate::utc::now(),
            has_builder: owned.fleet.has_builder(),
        };
        let html = render(&owned.fleet.snapshot(), &facts);
        let public_keys = owned.keys.iter().map(|k| k.public_key().to_string()).collect();
        Rendered {
            version,
            at: std::time::Instant::now(),
            html: Arc::new(html),
            json: Bytes::from(data.to_string()),
            public_keys: Arc::new(public_keys),
        }
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
    // The one part that depends on the request: how a client reaches this cache.
    let html = page.html.replacen(CLIENT_SLOT, &client_snippet(&headers, &page.public_keys), 1);
    ([(header::CACHE_CONTROL, "no-store")], Html(html)).into_response()
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

/// "5 min ago", for `at` (unix seconds) seen at `now`.
fn ago(now: i64, at: i64) -> String {
    let d = now.saturating_sub(at);
    match d {
        i64::MIN..=59 => "just now".into(),
        60..=3599 => format!("{} min ago", d / 60),
        3600..=172_799 => format!("{} h ago", d / 3600),
        _ => format!("{} days ago", d / 86_400),
    }
}

/// A time as the page shows it: relative, with the UTC minute as its title.
fn when(now: i64, at: i64) -> String {
    format!("<time title=\"{}\">{}</time>", esc(&crate::utc::minute(at)), esc(&ago(now, at)))
}

fn is_failed(r: &HostRecord) -> bool {
    r.last_build.as_ref().is_some_and(|b| b.status != "success")
}

fn host_html(repo: &str, host: &str, r: &HostRecord, now: i64, building: bool) -> String {
    let (status, class) = match r.last_build.as_ref().map(|b| b.status.as_str()) {
        _ if building => ("building now", "run"),
        Some("success") => ("built", "ok"),
        Some(_) => ("FAILED", "bad"),
        None if !r.branches.is_empty() => ("no build of the deploy branch yet", "muted"),
        None => ("no build since start", "muted"),
    };
    let last = r
        .last_build
        .as_ref()
        .map(|b| {
            let commit = b
                .commit
                .as_deref()
                .map(|c| format!(" at <code>{}</code>", esc(&c.chars().take(12).collect::<String>())))
                .unwrap_or_default();
            let word = if b.status == "success" { "built" } else { "failed" };
            format!(" · {word} {}{commit}", when(now, b.at))
        })
        .unwrap_or_default();
    let mut out = format!(
        "<section id=\"{}\"><h3>{} <span class=\"{class}\">{}</span></h3><p class=muted>{}{last}</p>",
        esc(&format!("{repo}/{host}")),
        esc(host),
        esc(status),
        esc(repo),
    );
    if let Some(b) = r.last_build.as_ref().filter(|b| b.status != "success") {
        if let Some(error) = &b.error {
            out.push_str(&format!("<pre class=err>{}</pre>", esc(error)));
        }
        if let Some(drv) = b.failed_drv.as_deref().and_then(|d| d.rsplit('/').next()) {
            out.push_str(&format!(
                "<p><a href=\"/log/{}\">build log of {}</a></p>",
                esc(drv),
                esc(drv.split_once('-').map_or(drv, |(_, n)| n))
            ));
        }
    }
    if let Some(g) = r.generations.last() {
        out.push_str(&format!(
            "<p>generation {} · built {}{}{}</p>",
            g.number,
            when(now, g.built_at),
            g.builder.as_deref().map(|b| format!(" by {}", esc(b))).unwrap_or_default(),
            r.closure_bytes
                .map(|b| format!(
                    " · closure {} in {} paths",
                    esc(&human_bytes(b as i64, false)),
                    r.closure_paths.unwrap_or(0)
                ))
                .unwrap_or_default()
        ));
        // Each generation's store path: what a rollback deploys.
        out.push_str("<ul class=gens>");
        for g in r.generations.iter().rev() {
            out.push_str(&format!(
                "<li>{} <code>{}</code> <span class=muted>{}{}</span></li>",
                g.number,
                esc(&g.path),
                when(now, g.built_at),
                g.builder.as_deref().map(|b| format!(" on {}", esc(b))).unwrap_or_default()
            ));
        }
        out.push_str("</ul>");
    }
    if let Some(b) = &r.bucket {
        out.push_str(&bucket_html(b, now));
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
            when(now, b.build.at),
            b.out_path.as_deref().map(|p| format!(" · {}", esc(short(p)))).unwrap_or_default()
        ));
    }
    out.push_str("</section>");
    out
}

/// How much of the newest system the S3 bucket holds (what a host could substitute if this
/// build host were gone).
fn bucket_html(b: &crate::fleet::BucketCopy, now: i64) -> String {
    let (class, text) = if b.failed > 0 {
        (
            "bad",
            format!(
                "{} of {} paths · {} failed to upload (the next build pushes them again)",
                b.present, b.total, b.failed
            ),
        )
    } else if b.queued > 0 {
        ("run", format!("{} of {} paths · {} uploading", b.present, b.total, b.queued))
    } else {
        ("ok", format!("all {} paths", b.total))
    };
    format!("<p>in the bucket: <span class={class}>{text}</span> <span class=muted>· {}</span></p>", when(now, b.at))
}

const STYLE: &str = "body{font:16px/1.45 system-ui,sans-serif;margin:0 auto;max-width:52rem;padding:1rem;color:#222}\
h1{font-size:1.4rem}h2{font-size:1.15rem;border-bottom:1px solid #ddd;margin-top:1.5rem}\
h3{font-size:1rem;margin:.2rem 0}section{padding:.6rem 0;border-bottom:1px solid #eee;overflow-wrap:anywhere}\
p{margin:.2rem 0}ul{margin:.2rem 0;padding-left:1.2rem}.ok{color:#17702a}.bad{color:#b00020}\
.muted{color:#666}.add{color:#17702a}.del{color:#b00020}code{font-size:.9em}.run{color:#8a5a00}\
pre{white-space:pre-wrap;overflow-wrap:anywhere;background:#f4f4f4;padding:.4rem;font-size:.85em;max-height:20rem;overflow:auto}\
.gens{font-size:.85em}.summary{font-size:1.1rem}details{margin:.4rem 0}\
@media (prefers-color-scheme:dark){body{background:#111;color:#ddd}.muted{color:#999}pre{background:#222}\
a{color:#8ab4f8}.ok,.add{color:#5fd17a}.bad,.del{color:#ff7b86}.run{color:#e0b050}}";

/// Hosts the HTML page shows at most (the rest are in `/fleet.json`), so that one page stays a
/// page: about 1 KiB of HTML each.
const MAX_PAGE_HOSTS: usize = 500;

/// Where the per-request part (the client snippet) goes in a cached page.
const CLIENT_SLOT: &str = "<!--client-->";

/// What the page shows besides the hosts.
struct Facts<'a> {
    cache: &'a Value,
    activity: &'a Activity,
    now: i64,
    has_builder: bool,
}

fn render(hosts: &Hosts, f: &Facts<'_>) -> String {
    let cache = f.cache;
    let mut body = String::new();
    let keys: Vec<&str> = cache["public_keys"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
    body.push_str(&format!(
        "<h1>hearth</h1><p class=muted>binary cache of <code>{}</code> · priority {} · {} · {}</p>{CLIENT_SLOT}",
        esc(cache["store_dir"].as_str().unwrap_or("")),
        cache["priority"],
        esc(&format!("compression {}", cache["compression"].as_str().unwrap_or("none"))),
        if keys.is_empty() {
            "unsigned (no signing key)".to_owned()
        } else {
            format!("signed by {}", esc(&keys.join(", ")))
        }
    ));
    if !f.has_builder {
        body.push_str("<p>This cache runs no builder: it serves its store, and records no builds.</p>");
    } else if hosts.is_empty() && f.activity.running.is_none() {
        body.push_str("<p>No build is recorded yet.</p>");
    }
    // A host is building if the running build is for it, or for all of its repo.
    let building = |repo: &str, host: &str| {
        f.activity.running.as_ref().is_some_and(|b| b.repo == repo && (b.target == host || b.target == "all"))
    };
    // The summary first: what is broken now, what is building.
    if f.has_builder && !hosts.is_empty() {
        let failed: Vec<_> = hosts.iter().filter(|(_, r)| is_failed(r)).collect();
        let built = hosts.values().filter(|r| r.last_build.as_ref().is_some_and(|b| b.status == "success")).count();
        let now_building = hosts.keys().filter(|(repo, host)| building(repo, host)).count();
        body.push_str(&format!(
            "<p class=summary><b class=ok>{built} built</b> · <b class=\"{}\">{} failed</b> · {now_building} building · {} queued</p>",
            if failed.is_empty() { "ok" } else { "bad" },
            failed.len(),
            f.activity.queued.len()
        ));
    }
    if let Some(b) = &f.activity.running {
        body.push_str(&format!(
            "<p class=run>building now: <b>{}</b> of {} (<code>{}</code>){}</p>",
            esc(&b.target),
            esc(&b.repo),
            esc(&b.branch),
            f.activity.since.map(|at| format!(", started {}", when(f.now, at))).unwrap_or_default()
        ));
    }
    if !f.activity.queued.is_empty() {
        let queued: Vec<String> = f
            .activity
            .queued
            .iter()
            .map(|b| format!("{} of {} (<code>{}</code>)", esc(&b.target), esc(&b.repo), esc(&b.branch)))
            .collect();
        body.push_str(&format!("<p class=muted>queued: {}</p>", queued.join(", ")));
    }
    // Failures first, then every repo's other hosts.
    let (failed, rest): (Vec<_>, Vec<_>) = hosts.iter().take(MAX_PAGE_HOSTS).partition(|(_, r)| is_failed(r));
    if !failed.is_empty() {
        body.push_str("<h2 class=bad>Failing</h2>");
        for ((repo, host), record) in failed {
            body.push_str(&host_html(repo, host, record, f.now, building(repo, host)));
        }
    }
    let mut repo_shown = None;
    for ((repo, host), record) in rest {
        if repo_shown != Some(repo) {
            body.push_str(&format!("<h2>{}</h2>", esc(repo)));
            repo_shown = Some(repo);
        }
        body.push_str(&host_html(repo, host, record, f.now, building(repo, host)));
    }
    if hosts.len() > MAX_PAGE_HOSTS {
        body.push_str(&format!(
            "<p class=muted>{} more hosts are not shown here; <a href=\"/fleet.json\">fleet.json</a> has them all.</p>",
            hosts.len() - MAX_PAGE_HOSTS
        ));
    }
    format!(
        "<!doctype html><html lang=en><head><meta charset=utf-8>\
         <meta name=viewport content=\"width=device-width,initial-scale=1\"><meta name=color-scheme content=\"light dark\">\
         <title>hearth · fleet</title><style>{STYLE}</style></head><body>{body}\
         <p class=muted><a href=\"/fleet.json\">fleet.json</a></p></body></html>"
    )
}

/// How a client uses this cache, as the request reached it (its `Host`, and
/// `X-Forwarded-Proto` from a proxy): the lines for `nix.conf`.
fn client_snippet(headers: &HeaderMap, public_keys: &[String]) -> String {
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .filter(|h| {
            !h.is_empty() && h.len() <= 255 && h.bytes().all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b))
        })
        .unwrap_or("this-cache");
    let proto = match headers.get("x-forwarded-proto").and_then(|v| v.to_str().ok()) {
        Some("https") => "https",
        _ => "http",
    };
    let keys = if public_keys.is_empty() { "(this cache signs nothing)".to_owned() } else { public_keys.join(" ") };
    format!(
        "<details><summary>Use this cache</summary><pre>substituters = {}://{}\ntrusted-public-keys = {}</pre></details>",
        proto,
        esc(host),
        esc(&keys)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::{Generation, LastBuild};
    use crate::nix::closure_diff::VersionChange;

    fn page_of(hosts: &Hosts, activity: &Activity) -> String {
        let cache = json!({"store_dir": "/nix/store", "priority": 30, "public_keys": []});
        render(hosts, &Facts { cache: &cache, activity, now: 10_000, has_builder: true })
    }

    #[test]
    fn the_page_says_what_is_broken_why_and_what_is_building() {
        let mut hosts = Hosts::new();
        let ok = HostRecord {
            last_build: Some(LastBuild::new("success", 9_000, None)),
            generations: vec![
                Generation {
                    number: 1,
                    path: "/nix/store/a-web1-old".into(),
                    built_at: 1_000,
                    commit: None,
                    builder: None,
                },
                Generation {
                    number: 2,
                    path: "/nix/store/b-web1-new".into(),
                    built_at: 9_000,
                    commit: None,
                    builder: Some("build<1>".into()),
                },
            ],
            ..HostRecord::default()
        };
        let broken = HostRecord {
            last_build: Some(LastBuild::failed(
                9_700,
                None,
                "error: builder for '/nix/store/4924di507lk0s315v70am3a9rf7nb5mq-db1.drv' failed with exit code 1\n<oops>",
            )),
            ..HostRecord::default()
        };
        let mut ok = ok;
        ok.bucket = Some(crate::fleet::BucketCopy { present: 40, total: 52, queued: 12, failed: 0, at: 9_990 });
        hosts.insert(("fleet".into(), "web1".into()), ok);
        hosts.insert(("fleet".into(), "zz-db1".into()), broken);
        let activity = Activity {
            running: Some(crate::fleet::ActiveBuild {
                repo: "fleet".into(),
                target: "web1".into(),
                branch: "master".into(),
            }),
            since: Some(9_940),
            queued: vec![crate::fleet::ActiveBuild {
                repo: "fleet".into(),
                target: "all".into(),
                branch: "master".into(),
            }],
        };
        let page = page_of(&hosts, &activity);
        let at = |needle: &str| page.find(needle).unwrap_or_else(|| panic!("no `{needle}` in {page}"));
        // The summary first, then the failure (sorted after web1 by name, shown before it).
        assert!(at("1 built") < at("Failing") && at("Failing") < at("zz-db1") && at("zz-db1") < at("<h3>web1"));
        assert!(page.contains("1 failed") && page.contains("1 building") && page.contains("1 queued"), "{page}");
        // Where each system's upload to the bucket stands.
        assert!(page.contains("in the bucket: <span class=run>40 of 52 paths · 12 uploading</span>"), "{page}");
        let failed = crate::fleet::BucketCopy { present: 50, total: 52, queued: 0, failed: 2, at: 9_000 };
        assert!(bucket_html(&failed, 10_000).contains("<span class=bad>50 of 52 paths · 2 failed to upload"));
        // Which builder built a generation, escaped.
        assert!(page.contains("by build&lt;1&gt;") && page.contains("on build&lt;1&gt;"), "{page}");
        assert!(
            page.contains("&lt;oops&gt;") && page.contains("href=\"/log/4924di507lk0s315v70am3a9rf7nb5mq-db1.drv\"")
        );
        assert!(page.contains("building now: <b>web1</b>") && page.contains("started <time"), "{page}");
        assert!(page.contains("<code>/nix/store/a-web1-old</code>") && page.contains("5 min ago"), "{page}");
        assert!(page.contains(CLIENT_SLOT));
        // Without a builder, the page says so rather than "no build yet".
        let cache = json!({"store_dir": "/nix/store", "priority": 30, "public_keys": []});
        let none =
            render(&Hosts::new(), &Facts { cache: &cache, activity: &Activity::default(), now: 0, has_builder: false });
        assert!(none.contains("runs no builder"), "{none}");
    }

    #[test]
    fn the_client_snippet_follows_the_request_and_is_escaped() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, "nix-cache.example.org".parse().unwrap());
        h.insert("x-forwarded-proto", "https".parse().unwrap());
        let s = client_snippet(&h, &["c-1:AAAA".to_owned()]);
        assert!(s.contains("substituters = https://nix-cache.example.org\ntrusted-public-keys = c-1:AAAA"), "{s}");
        let mut bad = HeaderMap::new();
        bad.insert(header::HOST, "<script>".parse().unwrap());
        bad.insert("x-forwarded-proto", "javascript".parse().unwrap());
        let s = client_snippet(&bad, &[]);
        assert!(s.contains("http://this-cache") && !s.contains("<script>"), "{s}");
    }

    #[test]
    fn everything_shown_is_escaped() {
        let mut hosts = Hosts::new();
        let record = HostRecord {
            last_build: Some(LastBuild::new("failure", 0, Some("a".repeat(40)))),
            generations: vec![Generation {
                number: 2,
                path: "/nix/store/x-<b>".into(),
                built_at: 0,
                commit: None,
                builder: None,
            }],
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
            bucket: None,
        };
        hosts.insert(("r&d".into(), "web\"1".into()), record);
        let page = page_of(&hosts, &Activity::default());
        assert!(!page.contains("<script>") && page.contains("&lt;script&gt;"));
        assert!(
            page.contains("r&amp;d")
                && page.contains("web&quot;1")
                && page.contains("<code>/nix/store/x-&lt;b&gt;</code>")
        );
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
        let page = page_of(&hosts, &Activity::default());
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
        let page = page_of(&hosts, &Activity::default());
        assert!(page.contains(&format!(" at <code>{}é", "a".repeat(11))), "{page}");
    }

    #[test]
    fn versions_read_as_diff_closures_prints_them() {
        assert_eq!(versions(&["".into(), "1.2".into()]), "ε, 1.2");
    }
}
