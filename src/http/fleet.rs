//! `GET /` and `GET /fleet.json`: the fleet page. Per repo and host: the last build's status and
//! time, the newest good generation, its closure size and what changed against the one before;
//! with no builder, the cache's own facts. One typed [`View`] is both: serialised for the JSON
//! (`/fleet.json`, or `/` with `Accept: application/json`), and rendered as server-side HTML
//! (no scripts, readable on a phone) with maud, which escapes every value unless told not to.
//! Nothing secret is shown: no keys, credentials or log lines.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, header};
use axum::response::{Html, IntoResponse, Response};
use maud::{DOCTYPE, Markup, PreEscaped, html};
use serde::Serialize;

use super::AppState;
use crate::fleet::{Activity, BucketCopy, HostRecord, Presence};
use crate::nix::closure_diff::{Changes, human_bytes, show_versions as versions};

/// What the page and `/fleet.json` show.
#[derive(Debug, Serialize)]
pub(crate) struct View {
    cache: CacheView,
    /// Whether this hearth runs a builder.
    builder: bool,
    activity: Activity,
    /// Every builder of a shared record: who lives, what each runs.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    builders: Vec<BuilderView>,
    /// The keys a client of the fleet trusts, as `trusted-public-keys` names them: this
    /// cache's own and every builder's (what any hearth of the fleet serves is signed by one).
    trusted_public_keys: Vec<String>,
    hosts: Vec<HostView>,
}

/// A builder as the page shows it.
#[derive(Debug, Serialize)]
struct BuilderView {
    #[serde(flatten)]
    presence: Presence,
    /// It said it lives within the last [`crate::fleet::PRESENCE_STALE_SECONDS`].
    alive: bool,
}

/// The cache's own facts.
#[derive(Debug, Serialize)]
struct CacheView {
    store_dir: String,
    priority: u32,
    /// The names of the keys it signs with.
    public_keys: Vec<String>,
    /// The same keys as a client's `trusted-public-keys` names them.
    trusted_public_keys: Vec<String>,
    compression: &'static str,
}

/// One host's record, with its repo and name.
#[derive(Debug, Serialize)]
struct HostView {
    repo: String,
    host: String,
    #[serde(flatten)]
    record: HostRecord,
}

impl HostView {
    fn is_failed(&self) -> bool {
        self.record.last_build.as_ref().is_some_and(|b| !b.status.is_success())
    }
}

/// The page's data: the cache's facts and every host's record.
fn view(state: &AppState) -> View {
    let hosts =
        state.fleet.snapshot().into_iter().map(|((repo, host), record)| HostView { repo, host, record }).collect();
    let now = crate::utc::now();
    let builders: Vec<BuilderView> = state
        .fleet
        .builders()
        .into_values()
        .map(|presence| BuilderView { alive: presence.is_alive(now), presence })
        .collect();
    let own = state.keys.iter().map(|k| k.public_key().to_string());
    let trusted = crate::fleet::fleet_keys(own, builders.iter().map(|b| &b.presence));
    View {
        cache: CacheView {
            store_dir: state.store.store_dir().to_owned(),
            priority: state.cache.priority,
            public_keys: state.keys.iter().map(|k| k.name().to_owned()).collect(),
            trusted_public_keys: state.keys.iter().map(|k| k.public_key().to_string()).collect(),
            compression: if state.cache.zstd_level.is_some() { "zstd" } else { "none" },
        },
        builder: state.fleet.has_builder(),
        activity: state.fleet.activity(),
        builders,
        trusted_public_keys: trusted,
        hosts,
    }
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
        let view = view(&owned);
        let html = render(&view, crate::utc::now());
        Rendered {
            version,
            at: std::time::Instant::now(),
            html: Arc::new(html),
            json: Bytes::from(serde_json::to_vec(&view).unwrap_or_default()),
            public_keys: Arc::new(view.trusted_public_keys),
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

/// A store path's name, without the store directory and hash.
fn short(path: &str) -> &str {
    let base = path.rsplit('/').next().unwrap_or(path);
    base.split_once('-').map_or(base, |(_, name)| name)
}

fn changes_html(c: &Changes) -> Markup {
    if c.first_build {
        return html! { p.muted { "first recorded build: nothing to compare with" } };
    }
    if c.is_empty() && c.bytes_delta() == 0 {
        return html! { p.muted { "no change from the previous generation" } };
    }
    html! {
        p {
            (c.changed.len()) " upgraded or downgraded, " (c.added.len()) " added, " (c.removed.len()) " removed, "
            (c.rebuilt) " rebuilt; " (human_bytes(c.bytes_delta(), true))
            " (" (c.paths_before) " → " (c.paths_after) " paths)"
        }
        ul {
            @for v in &c.changed {
                li { b { (v.name) } " " (versions(&v.old)) " → " (versions(&v.new)) " " span.muted { (human_bytes(v.size_delta, true)) } }
            }
            @for p in &c.added {
                li.add { "+ " b { (p.name) } " " (versions(&p.versions)) }
            }
            @for p in &c.removed {
                li.del { "− " b { (p.name) } " " (versions(&p.versions)) }
            }
            @if c.truncated > 0 {
                li.muted { "… and " (c.truncated) " more" }
            }
        }
    }
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
fn when(now: i64, at: i64) -> Markup {
    html! { time title=(crate::utc::minute(at)) { (ago(now, at)) } }
}

/// A host's headline word and its colour.
fn host_state(r: &HostRecord, building: bool) -> (&'static str, &'static str) {
    match r.last_build.as_ref().map(|b| b.status.is_success()) {
        _ if building => ("building now", "run"),
        Some(true) => ("built", "ok"),
        Some(false) => ("FAILED", "bad"),
        None if !r.branches.is_empty() => ("no build of the deploy branch yet", "muted"),
        None => ("no build since start", "muted"),
    }
}

fn host_html(h: &HostView, now: i64, building: bool) -> Markup {
    let r = &h.record;
    let (status, class) = host_state(r, building);
    html! {
        section id={ (h.repo) "/" (h.host) } {
            h3 { (h.host) " " span class=(class) { (status) } }
            p.muted {
                (h.repo)
                @if let Some(b) = &r.last_build {
                    " · " (if b.status.is_success() { "built" } else { "failed" }) " " (when(now, b.at))
                    @if let Some(c) = &b.commit { " at " code { (c.chars().take(12).collect::<String>()) } }
                }
            }
            @if let Some(b) = r.last_build.as_ref().filter(|b| !b.status.is_success()) {
                @if let Some(error) = &b.error { pre.err { (error) } }
                @if let Some(drv) = b.failed_drv.as_deref().and_then(|d| d.rsplit('/').next()) {
                    p { a href={ "/log/" (drv) } { "build log of " (short(drv)) } }
                }
            }
            (generations_html(r, now))
            @if let Some(b) = &r.bucket { (bucket_html(b, now)) }
            @if let Some(c) = &r.changes { (changes_html(c)) }
            // Other branches' builds: shown under their branch, never as the host's state.
            @for (branch, b) in &r.branches {
                p.muted {
                    "branch " code { (branch) } ": "
                    @if b.build.status.is_success() { span.ok { "built" } } @else { span.bad { "failed" } }
                    " " (when(now, b.build.at))
                    @if let Some(p) = &b.out_path { " · " (short(p)) }
                }
            }
        }
    }
}

/// The newest generation, then each generation's store path: what a rollback deploys.
fn generations_html(r: &HostRecord, now: i64) -> Markup {
    let Some(g) = r.generations.last() else { return html! {} };
    html! {
        p {
            "generation " (g.number) " · built " (when(now, g.built_at))
            @if let Some(b) = &g.builder { " by " (b) }
            @if let Some(bytes) = r.closure_bytes {
                " · closure " (human_bytes(i64::try_from(bytes).unwrap_or(i64::MAX), false)) " in " (r.closure_paths.unwrap_or(0)) " paths"
            }
        }
        ul.gens {
            @for g in r.generations.iter().rev() {
                li {
                    (g.number) " " code { (g.path) } " "
                    span.muted { (when(now, g.built_at)) @if let Some(b) = &g.builder { " on " (b) } }
                }
            }
        }
    }
}

/// How much of the newest system the S3 bucket holds (what a host could substitute if this
/// build host were gone).
fn bucket_html(copy: &BucketCopy, now: i64) -> Markup {
    let b = &copy.pushed;
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
    html! { p { "in the bucket: " span class=(class) { (text) } " " span.muted { "· " (when(now, copy.at)) } } }
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

/// Whether a running build (this builder's, or a live builder's of the fleet) is for `h`: for
/// it, or for all of its repo.
fn is_building(view: &View, h: &HostView) -> bool {
    let here = view.activity.running.iter();
    let elsewhere = view.builders.iter().filter(|b| b.alive).filter_map(|b| b.presence.running.as_ref());
    here.chain(elsewhere).any(|b| b.repo == h.repo && (b.target == h.host || b.target == "all"))
}

/// Requests waiting for a build: this builder's own queue, every other live builder's, and
/// the JetStream queue's (for any builder).
fn queued(view: &View) -> usize {
    let others: usize = view.builders.iter().filter(|b| b.alive).map(|b| b.presence.queued).sum();
    let own = if view.builders.is_empty() { view.activity.queued.len() } else { 0 };
    let stream = view.activity.waiting_in_stream.unwrap_or(0);
    own + others + usize::try_from(stream).unwrap_or(usize::MAX)
}

/// The line under the title: the store, priority, compression and keys.
fn cache_html(c: &CacheView) -> Markup {
    html! {
        h1 { "hearth" }
        p.muted {
            "binary cache of " code { (c.store_dir) } " · priority " (c.priority) " · compression " (c.compression) " · "
            @if c.public_keys.is_empty() { "unsigned (no signing key)" } @else { "signed by " (c.public_keys.join(", ")) }
        }
        (PreEscaped(CLIENT_SLOT))
    }
}

/// What is broken now, what is building and what waits: counted over every host.
fn summary_html(view: &View, failed: usize, now: i64) -> Markup {
    let a = &view.activity;
    let built =
        view.hosts.iter().filter(|h| h.record.last_build.as_ref().is_some_and(|b| b.status.is_success())).count();
    let building = view.hosts.iter().filter(|h| is_building(view, h)).count();
    html! {
        @if !view.builder && view.hosts.is_empty() && view.builders.is_empty() {
            p { "This cache runs no builder: it serves its store, and records no builds." }
        } @else if !view.builder {
            p { "This cache runs no builder; it shows the fleet's shared record." }
        } @else if view.hosts.is_empty() && a.running.is_none() {
            p { "No build is recorded yet." }
        }
        @if !view.hosts.is_empty() {
            p.summary {
                b.ok { (built) " built" } " · " b class=(if failed == 0 { "ok" } else { "bad" }) { (failed) " failed" }
                " · " (building) " building · " (queued(view)) " queued"
            }
        }
        @if let Some(b) = &a.running {
            p.run {
                "building now: " b { (b.target) } " of " (b.repo) " (" code { (b.branch) } ")"
                @if let Some(at) = a.since { ", started " (when(now, at)) }
            }
        }
        @if let Some(n) = a.waiting_in_stream.filter(|n| *n > 0) {
            p.muted { (n) " request(s) waiting in the JetStream queue for any builder" }
        }
        @if !a.queued.is_empty() {
            p.muted {
                "queued: "
                @for (i, b) in a.queued.iter().enumerate() {
                    @if i > 0 { ", " }
                    (b.target) " of " (b.repo) " (" code { (b.branch) } ")"
                }
            }
        }
    }
}

/// Every builder of the shared record: alive or not heard from, what it runs, what it holds.
fn builders_html(builders: &[BuilderView], now: i64) -> Markup {
    html! {
        @if !builders.is_empty() {
            h2 { "Builders" }
            ul {
                @for b in builders {
                    @let p = &b.presence;
                    li {
                        b { (p.name) } " "
                        @if b.alive { span.ok { "alive" } } @else { span.bad { "not heard from" } }
                        " · "
                        @if let Some(r) = &p.running {
                            span.run { "building " (r.target) " of " (r.repo) " (" code { (r.branch) } ")" }
                            @if let Some(c) = &p.commit { " at " code { (c.chars().take(12).collect::<String>()) } }
                            @if let Some(at) = p.since { ", started " (when(now, at)) }
                        } @else { "idle" }
                        @if p.queued > 0 { " · " (p.queued) " queued" }
                        " · " span.muted { "last heard " (when(now, p.seen_at)) }
                    }
                }
            }
        }
    }
}

/// The whole page. Failing hosts come first, then every repo's other hosts; at most
/// [`MAX_PAGE_HOSTS`] are shown, failing ones before any other, and the rest are counted.
fn render(view: &View, now: i64) -> String {
    let (failed, rest): (Vec<&HostView>, Vec<&HostView>) = view.hosts.iter().partition(|h| h.is_failed());
    let failed_shown = &failed[..failed.len().min(MAX_PAGE_HOSTS)];
    let rest_shown = &rest[..rest.len().min(MAX_PAGE_HOSTS - failed_shown.len())];
    let hidden = view.hosts.len() - failed_shown.len() - rest_shown.len();
    let page = html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width,initial-scale=1";
                meta name="color-scheme" content="light dark";
                title { "hearth · fleet" }
                style { (PreEscaped(STYLE)) }
            }
            body {
                (cache_html(&view.cache))
                (summary_html(view, failed.len(), now))
                (builders_html(&view.builders, now))
                @if !failed_shown.is_empty() {
                    h2.bad { "Failing" }
                    @for h in failed_shown { (host_html(h, now, is_building(view, h))) }
                }
                @for (i, h) in rest_shown.iter().enumerate() {
                    @if i == 0 || rest_shown[i - 1].repo != h.repo { h2 { (h.repo) } }
                    (host_html(h, now, is_building(view, h)))
                }
                @if hidden > 0 {
                    p.muted { (hidden) " more hosts are not shown here; " a href="/fleet.json" { "fleet.json" } " has them all." }
                }
                p.muted { a href="/fleet.json" { "fleet.json" } }
            }
        }
    };
    page.into_string()
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
    let keys = if public_keys.is_empty() {
        "(this cache signs nothing: trust the keys of the builders whose paths it serves)".to_owned()
    } else {
        public_keys.join(" ")
    };
    let snippet = html! {
        details {
            summary { "Use this cache" }
            pre { "substituters = " (proto) "://" (host) "\ntrusted-public-keys = " (keys) }
        }
    };
    snippet.into_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::{BuildResult, Generation, Hosts, LastBuild};
    use crate::nix::closure_diff::VersionChange;

    fn view_of(hosts: &Hosts, activity: &Activity, builder: bool) -> View {
        View {
            cache: CacheView {
                store_dir: "/nix/store".into(),
                priority: 30,
                public_keys: Vec::new(),
                trusted_public_keys: Vec::new(),
                compression: "none",
            },
            builder,
            activity: activity.clone(),
            builders: Vec::new(),
            trusted_public_keys: Vec::new(),
            hosts: hosts
                .iter()
                .map(|((repo, host), record)| HostView {
                    repo: repo.clone(),
                    host: host.clone(),
                    record: record.clone(),
                })
                .collect(),
        }
    }

    fn pushed(present: usize, total: usize, queued: usize, failed: usize) -> crate::fleet::Pushed {
        crate::fleet::Pushed { present, total, queued, failed, uploaded: 0 }
    }

    fn page_of(hosts: &Hosts, activity: &Activity) -> String {
        render(&view_of(hosts, activity, true), 10_000)
    }

    #[test]
    fn every_builders_work_is_counted_and_the_fleets_keys_offered() {
        let mut hosts = Hosts::new();
        let built =
            HostRecord { last_build: Some(LastBuild::new(BuildResult::Success, 9_000, None)), ..HostRecord::default() };
        hosts.insert(("r".into(), "web1".into()), built.clone());
        hosts.insert(("r".into(), "db1".into()), built);
        let activity = Activity { waiting_in_stream: Some(3), ..Activity::default() };
        let mut view = view_of(&hosts, &activity, true);
        let presence = |name: &str, running: Option<&str>, seen_at: i64| Presence {
            name: name.into(),
            public_keys: vec![format!("{name}-1:AAAA")],
            seen_at,
            running: running.map(|t| crate::fleet::ActiveBuild {
                repo: "r".into(),
                target: t.into(),
                branch: "m".into(),
            }),
            commit: None,
            since: None,
            queued: 2,
        };
        view.builders = vec![
            BuilderView { presence: presence("b1", Some("web1"), 10_000), alive: true },
            // Not heard from: neither its build nor its queue counts.
            BuilderView { presence: presence("b2", Some("db1"), 1), alive: false },
        ];
        let page = render(&view, 10_000);
        assert!(page.contains("1 building · 5 queued"), "{page}");
        assert!(page.contains("<b>b1</b> <span class=\"ok\">alive</span>"), "{page}");
        assert!(page.contains("<b>b2</b> <span class=\"bad\">not heard from</span>"), "{page}");
    }

    #[test]
    fn the_page_says_what_is_broken_why_and_what_is_building() {
        let mut hosts = Hosts::new();
        let ok = HostRecord {
            last_build: Some(LastBuild::new(BuildResult::Success, 9_000, None)),
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
        ok.bucket = Some(crate::fleet::BucketCopy { pushed: pushed(40, 52, 12, 0), at: 9_990 });
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
            waiting_in_stream: Some(3),
        };
        let page = page_of(&hosts, &activity);
        assert!(page.contains("3 request(s) waiting in the JetStream queue"), "{page}");
        let at = |needle: &str| page.find(needle).unwrap_or_else(|| panic!("no `{needle}` in {page}"));
        // The summary first, then the failure (sorted after web1 by name, shown before it).
        assert!(at("1 built") < at("Failing") && at("Failing") < at("zz-db1") && at("zz-db1") < at("<h3>web1"));
        // Queued: its own one and the three waiting in the stream for any builder.
        assert!(page.contains("1 failed") && page.contains("1 building") && page.contains("4 queued"), "{page}");
        // Where each system's upload to the bucket stands.
        assert!(page.contains("in the bucket: <span class=\"run\">40 of 52 paths · 12 uploading</span>"), "{page}");
        let failed = crate::fleet::BucketCopy { pushed: pushed(50, 52, 0, 2), at: 9_000 };
        let failed = bucket_html(&failed, 10_000).into_string();
        assert!(failed.contains("<span class=\"bad\">50 of 52 paths · 2 failed to upload"), "{failed}");
        // Which builder built a generation, escaped.
        assert!(page.contains("by build&lt;1&gt;") && page.contains("on build&lt;1&gt;"), "{page}");
        assert!(
            page.contains("&lt;oops&gt;") && page.contains("href=\"/log/4924di507lk0s315v70am3a9rf7nb5mq-db1.drv\"")
        );
        assert!(page.contains("building now: <b>web1</b>") && page.contains("started <time"), "{page}");
        assert!(page.contains("<code>/nix/store/a-web1-old</code>") && page.contains("5 min ago"), "{page}");
        assert!(page.contains(CLIENT_SLOT));
        // Without a builder, the page says so rather than "no build yet".
        let none = render(&view_of(&Hosts::new(), &Activity::default(), false), 0);
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
            last_build: Some(LastBuild::new(BuildResult::Failure, 0, Some("a".repeat(40)))),
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
                    build: LastBuild::new(BuildResult::Failure, 0, None),
                    out_path: Some("/nix/store/y-<i>".into()),
                },
            )]
            .into(),
            bucket: None,
            superseded: None,
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
                last_build: Some(LastBuild::new(BuildResult::Success, 0, Some("c".repeat(40)))),
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
    fn failing_hosts_past_the_bound_are_counted_and_shown_first() {
        let mut hosts = Hosts::new();
        for i in 0..600 {
            let build = if i >= 500 && i % 10 == 0 {
                LastBuild::failed(0, None, &format!("error: host{i:04} broke"))
            } else {
                LastBuild::new(BuildResult::Success, 0, None)
            };
            let record = HostRecord { last_build: Some(build), ..HostRecord::default() };
            hosts.insert(("fleet".into(), format!("host{i:04}")), record);
        }
        let page = page_of(&hosts, &Activity::default());
        assert!(page.contains("590 built") && page.contains("10 failed"), "{page}");
        let failing = page.find("Failing").expect("a Failing section");
        for i in (500..600).step_by(10) {
            let at = page.find(&format!("<h3>host{i:04}")).unwrap_or_else(|| panic!("host{i:04} not shown"));
            assert!(at > failing && at < page.find("<h3>host0000").unwrap(), "host{i:04} is not among the first");
        }
        // 10 failing and 490 others shown: 100 hidden, and said.
        assert!(page.contains("100 more hosts are not shown here"), "{page}");
    }

    #[test]
    fn the_json_is_the_view_with_each_record_flattened() {
        let mut hosts = Hosts::new();
        let record =
            HostRecord { last_build: Some(LastBuild::new(BuildResult::Success, 5, None)), ..HostRecord::default() };
        hosts.insert(("fleet".into(), "web1".into()), record);
        let json = serde_json::to_value(view_of(&hosts, &Activity::default(), true)).unwrap();
        assert_eq!(json["hosts"][0]["repo"], "fleet");
        assert_eq!(json["hosts"][0]["host"], "web1");
        assert_eq!(json["hosts"][0]["last_build"]["status"], "success");
        assert_eq!(json["cache"]["priority"], 30);
        assert_eq!(json["builder"], true);
    }

    #[test]
    fn a_commit_with_multi_byte_characters_renders() {
        // A hand-edited or damaged record: the 12th byte is inside a character.
        let mut hosts = Hosts::new();
        let commit = format!("{}é{}", "a".repeat(11), "b".repeat(10));
        let record = HostRecord {
            last_build: Some(LastBuild::new(BuildResult::Success, 0, Some(commit))),
            ..HostRecord::default()
        };
        hosts.insert(("r".into(), "h".into()), record);
        let page = page_of(&hosts, &Activity::default());
        assert!(page.contains(&format!(" at <code>{}é", "a".repeat(11))), "{page}");
    }

    #[test]
    fn versions_read_as_diff_closures_prints_them() {
        assert_eq!(versions(&["".into(), "1.2".into()]), "ε, 1.2");
    }
}
