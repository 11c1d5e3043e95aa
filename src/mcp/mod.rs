//! `hearth mcp`: a Model Context Protocol server over stdio (the official `rmcp` SDK) that lets an
//! AI assistant list the builder's repos, check what the cache holds, and (with `--enable-builds`)
//! build hosts and read the per-host summary.
//!
//! A client of the cache (HTTP) and of the builder (NATS), like `hearth build`: it never touches
//! the store. Invalid arguments are refused as the builder would refuse them, as MCP errors.
//!
//! Builds take minutes to hours: `build` sends a progress notification for every builder reply
//! (when the client gave a progress token), and `build` with `wait: false` returns a build id at
//! once, which `build_status` answers for ([`builds`]). Without a config it says so instead of
//! answering as if nothing were configured.

mod builds;
mod framing;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::BodyExt;
use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::{
    CallToolResult, ContentBlock, Implementation, ProgressNotificationParam, ProgressToken, RequestMetaObject,
    ServerCapabilities, ServerConfig,
};
use rmcp::{ErrorData, Peer, RoleServer, ServerHandler, ServiceExt, schemars, tool, tool_handler, tool_router};
use serde::Deserialize;

use crate::builder::cli::headline;
use crate::builder::client::{NatsArgs, parse_duration, request_build, validate};
use crate::builder::config::RepoConfig;
use crate::builder::job::Status;
use crate::config::Config;
use crate::nix::store_path::{StorePath, StorePathHash};

#[derive(Debug, clap::Args)]
pub struct McpArgs {
    /// Offer the `build` tool (off by default: a build is not free).
    #[arg(long)]
    pub enable_builds: bool,
    /// hearth's configuration, for the builder's repos and GC roots.
    #[arg(long, env = "HEARTH_CONFIG")]
    pub config: Option<PathBuf>,
    /// The cache to check narinfos against.
    #[arg(long, env = "HEARTH_CACHE_URL", default_value = "http://127.0.0.1:5000")]
    pub cache_url: String,
    #[command(flatten)]
    pub nats: NatsArgs,
    /// How long a `build` call may follow its build.
    #[arg(long, default_value = "5h", value_parser = parse_duration)]
    pub build_timeout: Duration,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct BuildParams {
    /// A repo the builder serves (see `list_repos`).
    pub repo: String,
    /// A host name of the repo's flake, or `all` for every host.
    pub target: String,
    /// A branch to build instead of the repo's default branch.
    #[serde(default)]
    pub branch: Option<String>,
    /// A commit id (or a unique abbreviation of 7+ hex digits) to build instead of the branch's
    /// current commit.
    #[serde(default)]
    pub rev: Option<String>,
    /// `true` (default): wait for the result, with progress notifications. `false`: return a
    /// `build_id` at once and ask `build_status` later (for builds longer than the client waits).
    /// The strings `"true"` and `"false"` are taken too (some clients send only strings).
    #[serde(default, deserialize_with = "lenient_bool")]
    pub wait: Option<bool>,
}

/// A boolean, or the strings `true`/`false` (the MCP Inspector CLI's `--tool-arg wait=false`).
fn lenient_bool<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<bool>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Lenient {
        Bool(bool),
        Text(String),
    }
    match Option::<Lenient>::deserialize(d)? {
        None => Ok(None),
        Some(Lenient::Bool(b)) => Ok(Some(b)),
        Some(Lenient::Text(t)) => match t.trim().to_ascii_lowercase().as_str() {
            "true" | "yes" | "1" => Ok(Some(true)),
            "false" | "no" | "0" => Ok(Some(false)),
            other => Err(serde::de::Error::custom(format!("`wait` must be true or false, not `{other}`"))),
        },
    }
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct HostParams {
    /// A repo the builder serves (see `list_repos`).
    pub repo: String,
    /// A host of the repo's flake.
    pub host: String,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct BuildStatusParams {
    /// The `build_id` that `build` returned.
    pub build_id: String,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct CacheStatusParams {
    /// A store path (`/nix/store/<hash>-<name>`) or its 32-character hash.
    #[serde(default)]
    pub store_path: Option<String>,
    /// With `host`, instead of `store_path`: the repo whose host's last successful build to check.
    #[serde(default)]
    pub repo: Option<String>,
    /// With `repo`: the host whose last successful build to check.
    #[serde(default)]
    pub host: Option<String>,
}

#[derive(Clone)]
pub struct HearthMcp {
    enable_builds: bool,
    /// The config file read, and whether it has a `[builder]` section.
    config_path: Option<PathBuf>,
    has_builder: bool,
    repos: Vec<RepoConfig>,
    gcroots_dir: PathBuf,
    store_dir: String,
    cache_url: String,
    nats: NatsArgs,
    build_timeout: Duration,
    builds: Arc<builds::Builds>,
    tool_router: ToolRouter<Self>,
}

/// A build's parameters checked as the builder will check them, and its repo among the
/// configured ones (when the server knows them).
fn check_build(p: &BuildParams, repos: &[RepoConfig]) -> Result<(), ErrorData> {
    validate(&p.repo, &p.target, p.branch.as_deref()).map_err(|(_, m)| invalid(m))?;
    if p.rev.as_deref().is_some_and(|r| !crate::builder::job::is_valid_rev_request(r)) {
        return Err(invalid("`rev` must be a commit id (7 to 40 lowercase hex digits)"));
    }
    if !repos.is_empty() && !repos.iter().any(|r| r.name == p.repo) {
        return Err(invalid(format!("unknown repo `{}` (see list_repos)", p.repo)));
    }
    Ok(())
}

/// Follows a build to its final reply: each reply's headline goes into the session's build
/// list and, with a progress token, out as a progress notification (in order, off the reply
/// loop, so a slow client never holds up reading replies).
async fn follow_build(
    client: crate::builder::client::Deployer,
    builds: Arc<builds::Builds>,
    id: String,
    p: BuildParams,
    timeout: std::time::Duration,
    token: Option<ProgressToken>,
    peer: Peer<RoleServer>,
) -> Result<crate::builder::job::Reply, (u8, String)> {
    let mut sent = 0u32;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let notify = async {
        while let Some(line) = rx.recv().await {
            if let Some(token) = &token {
                sent += 1;
                let param = ProgressNotificationParam::new(token.clone(), f64::from(sent)).with_message(line);
                let _ = peer.notify_progress(param).await;
            }
        }
    };
    let follow = async {
        let (branch, rev) = (p.branch.as_deref(), p.rev.as_deref());
        let r = request_build(&client, &p.repo, &p.target, branch, rev, (timeout, None), |reply, _| {
            let line = headline(reply);
            builds.update(&id, reply, line.clone());
            let _ = tx.send(line);
        })
        .await;
        drop(tx);
        r
    };
    let (result, ()) = tokio::join!(follow, notify);
    if let Err((_, why)) = &result {
        builds.fail(&id, why.clone());
    }
    result
}

fn invalid(msg: impl Into<String>) -> ErrorData {
    ErrorData::invalid_params(msg.into(), None)
}

fn json_result(value: &serde_json::Value, ok: bool) -> CallToolResult {
    let text = serde_json::to_string_pretty(value).unwrap_or_default();
    if ok {
        CallToolResult::success(vec![ContentBlock::text(text)])
    } else {
        CallToolResult::error(vec![ContentBlock::text(text)])
    }
}

#[tool_router]
impl HearthMcp {
    pub fn new(args: &McpArgs, config: Option<Config>) -> Self {
        let has_builder = config.as_ref().is_some_and(|c| c.builder.is_some());
        let (repos, gcroots_dir, store_dir) = match config {
            Some(c) => (
                c.builder.as_ref().map(|b| b.repos.clone()).unwrap_or_default(),
                c.builder.map(|b| b.gcroots_dir).unwrap_or_else(|| "/nix/var/nix/gcroots/hearth".into()),
                c.store.store_dir,
            ),
            None => (Vec::new(), "/nix/var/nix/gcroots/hearth".into(), "/nix/store".into()),
        };
        Self {
            enable_builds: args.enable_builds,
            config_path: args.config.clone(),
            has_builder,
            repos,
            gcroots_dir,
            store_dir,
            cache_url: args.cache_url.trim_end_matches('/').to_owned(),
            nats: args.nats.clone(),
            build_timeout: args.build_timeout,
            builds: Arc::new(builds::Builds::default()),
            tool_router: {
                let mut router = Self::tool_router();
                // A tool the session cannot use is not offered.
                if !args.enable_builds {
                    router.remove_route("build");
                }
                router
            },
        }
    }

    /// The cache's fleet record (`/fleet.json`), as the page shows it.
    async fn fleet_record(&self) -> Result<serde_json::Value, ErrorData> {
        let url = format!("{}/fleet.json", self.cache_url);
        let (status, body) =
            http_get(&url).await.map_err(|e| ErrorData::internal_error(format!("{url}: {e}"), None))?;
        if status != 200 {
            return Err(ErrorData::internal_error(format!("the cache answered {status} for {url}"), None));
        }
        serde_json::from_str(&body).map_err(|e| ErrorData::internal_error(format!("{url}: {e}"), None))
    }

    /// One host's entry in the fleet record, if it has one.
    async fn host_record(&self, repo: &str, host: &str) -> Result<Option<serde_json::Value>, ErrorData> {
        let record = self.fleet_record().await?;
        Ok(record["hosts"].as_array().into_iter().flatten().find(|h| h["repo"] == repo && h["host"] == host).cloned())
    }

    /// Why the builder's repos and GC roots are unknown here, if they are.
    fn missing_config(&self) -> Option<String> {
        match &self.config_path {
            None => Some(
                "hearth mcp was started without hearth's config (--config or HEARTH_CONFIG), so the builder's \
                 repos and build records are unknown here; this does not mean there are none"
                    .into(),
            ),
            Some(p) if !self.has_builder => {
                Some(format!("{} has no [builder] section: this host runs no builder", p.display()))
            }
            Some(_) => None,
        }
    }

    /// The repos the builder accepts, from hearth's configuration.
    #[tool(description = "List the flake repos the hearth builder accepts (name, flake URL, default branch), from \
        hearth's config; says which config was read, or that none was.")]
    async fn list_repos(&self) -> Result<CallToolResult, ErrorData> {
        let repos: Vec<_> =
            self.repos.iter().map(|r| serde_json::json!({"name": r.name, "url": r.url, "branch": r.branch})).collect();
        let mut value = serde_json::json!({
            "config": self.config_path.as_ref().map(|p| p.display().to_string()),
            "repos": repos,
        });
        if let Some(why) = self.missing_config() {
            value["note"] = why.into();
        }
        Ok(json_result(&value, true))
    }

    #[tool(description = "Build a repo's NixOS host (or `all` hosts) on the build host. With `wait` (default) it \
        returns the result: per host the output path, or the error with the build log's tail; progress \
        notifications come meanwhile. With `wait: false` it returns a `build_id` at once: poll \
        `build_status`. Builds take minutes to hours. Only when hearth mcp runs with --enable-builds.")]
    async fn build(
        &self,
        Parameters(p): Parameters<BuildParams>,
        meta: RequestMetaObject,
        peer: Peer<RoleServer>,
    ) -> Result<CallToolResult, ErrorData> {
        if !self.enable_builds {
            return Err(ErrorData::invalid_request("builds are disabled: start `hearth mcp --enable-builds`", None));
        }
        check_build(&p, &self.repos)?;
        let client = self.nats.connect("hearth-mcp").await.map_err(|(_, m)| ErrorData::internal_error(m, None))?;
        let id = crate::builder::client::random_id();
        self.builds.start(&id, &p.repo, &p.target).ok_or_else(|| {
            ErrorData::invalid_request("too many builds from this session are running; wait for one to end", None)
        })?;
        // Progress belongs to a request that is still open: none once `build` has returned.
        let wait = p.wait != Some(false);
        let token = if wait { meta.get_progress_token() } else { None };
        let run = follow_build(client, self.builds.clone(), id.clone(), p, self.build_timeout, token, peer);
        if !wait {
            tokio::spawn(run);
            let value = serde_json::json!({
                "build_id": id,
                "state": "running",
                "hint": "call build_status with this build_id until state is not `running`",
            });
            return Ok(json_result(&value, true));
        }
        let reply = run.await.map_err(|(_, m)| ErrorData::internal_error(m, None))?;
        let mut value = serde_json::to_value(&reply).unwrap_or_default();
        value["build_id"] = id.into();
        Ok(json_result(&value, reply.status == Status::Completed))
    }

    #[tool(description = "The state of a build started with `build` in this session: `running`, `completed`, \
        `failed`, `rejected`, `interrupted` or `error`, its commit, the last progress lines, and the final result \
        once it ended. Build ids live in this hearth mcp process only (the last 100, for 24 hours): they are gone \
        when it restarts; the builds' results stay in the fleet record (the `fleet` tool).")]
    async fn build_status(&self, Parameters(p): Parameters<BuildStatusParams>) -> Result<CallToolResult, ErrorData> {
        let value = self.builds.status(&p.build_id).ok_or_else(|| {
            invalid(format!(
                "no build `{}` is known to this hearth mcp process (ids live only in it, for 24 h); the fleet tool \
                 shows every host's last build",
                p.build_id
            ))
        })?;
        Ok(json_result(&value, true))
    }

    #[tool(
        description = "Is a store path in the binary cache? Give `store_path` (a /nix/store path or its hash), or `repo` and `host` to check that host's last successful build."
    )]
    async fn cache_status(&self, Parameters(p): Parameters<CacheStatusParams>) -> Result<CallToolResult, ErrorData> {
        // The host's newest build failed: what is cached is an older system, and it says so.
        let mut failed_since: Option<serde_json::Value> = None;
        let (hash, path) = match (&p.store_path, &p.repo, &p.host) {
            (Some(sp), None, None) => {
                let parsed = StorePath::from_absolute(&self.store_dir, sp).or_else(|| StorePath::from_basename(sp));
                match parsed {
                    Some(path) => (path.hash(), Some(path.to_absolute(&self.store_dir))),
                    None => {
                        (StorePathHash::parse(sp.as_bytes()).ok_or_else(|| invalid("not a store path or hash"))?, None)
                    }
                }
            }
            (None, Some(repo), Some(host)) => {
                validate(repo, host, None).map_err(|(_, m)| invalid(m))?;
                if let Some(why) = self.missing_config() {
                    return Err(invalid(format!("cannot tell where {host}'s builds are recorded: {why}")));
                }
                let record = self.host_record(repo, host).await?;
                let last = record.as_ref().map(|r| r["last_build"].clone()).unwrap_or_default();
                let link = self.gcroots_dir.join(repo).join(host);
                let Ok(target) = std::fs::read_link(&link) else {
                    // Never built here: an answer, not an error.
                    let value = serde_json::json!({
                        "cached": false,
                        "repo": repo,
                        "host": host,
                        "last_build": last,
                        "note": format!("no successful build of {host} in {repo} is recorded on this machine"),
                    });
                    return Ok(json_result(&value, true));
                };
                let target = target.to_string_lossy().into_owned();
                if last["status"] == "failure" {
                    failed_since = Some(last);
                }
                let path = StorePath::from_absolute(&self.store_dir, &target)
                    .ok_or_else(|| ErrorData::internal_error("the GC root points outside the store", None))?;
                (path.hash(), Some(target))
            }
            _ => return Err(invalid("give either `store_path`, or `repo` and `host`")),
        };
        let url = format!("{}/{hash}.narinfo", self.cache_url);
        let (status, body) =
            http_get(&url).await.map_err(|e| ErrorData::internal_error(format!("{url}: {e}"), None))?;
        let mut value = match status {
            200 => {
                let info = crate::nix::narinfo::NarInfo::parse(&body);
                serde_json::json!({
                    "cached": true,
                    "store_path": info.as_ref().map(|i| i.store_path.clone()).or(path),
                    "nar_size": info.as_ref().map(|i| i.nar_size),
                    "signatures": info.as_ref().map(|i| i.sigs.iter().map(|s| s.split(':').next().unwrap_or("").to_owned()).collect::<Vec<_>>()),
                    "narinfo_url": url,
                })
            }
            404 => serde_json::json!({"cached": false, "store_path": path, "narinfo_url": url}),
            other => return Err(ErrorData::internal_error(format!("the cache answered {other} for {url}"), None)),
        };
        if let Some(last) = failed_since {
            value["newest_build_failed"] = true.into();
            value["last_build"] = last;
            value["note"] =
                "the host's newest build failed: this is its last good system, not what its flake says now".into();
        }
        Ok(json_result(&value, true))
    }

    #[tool(description = "The fleet as the cache's page shows it: per repo and host the last build (status, time, \
        commit, a failure's error tail), the generations kept for rollback (store paths), the newest system's \
        closure size and what changed against the one before, and recent builds of other branches.")]
    async fn fleet(&self) -> Result<CallToolResult, ErrorData> {
        let mut record = self.fleet_record().await?;
        if let Some(why) = self.missing_config() {
            record["note"] = why.into();
        }
        Ok(json_result(&record, true))
    }

    #[tool(description = "Why a host's last build failed: the error with the end of its log, as the builder \
        recorded it, and the end of the failed derivation's own build log when the cache has it.")]
    async fn build_log(&self, Parameters(p): Parameters<HostParams>) -> Result<CallToolResult, ErrorData> {
        validate(&p.repo, &p.host, None).map_err(|(_, m)| invalid(m))?;
        let Some(record) = self.host_record(&p.repo, &p.host).await? else {
            let value =
                serde_json::json!({"repo": p.repo, "host": p.host, "note": "no build of this host is recorded"});
            return Ok(json_result(&value, true));
        };
        let last = &record["last_build"];
        let mut value = serde_json::json!({
            "repo": p.repo,
            "host": p.host,
            "status": last["status"],
            "commit": last["commit"],
            "error": last["error"],
            "failed_drv": last["failed_drv"],
        });
        if last["status"] != "failure" {
            value["note"] = "the host's last build succeeded".into();
        }
        if let Some(drv) = last["failed_drv"].as_str().and_then(|d| d.rsplit('/').next()) {
            let url = format!("{}/log/{drv}", self.cache_url);
            if let Ok((200, text)) = http_get(&url).await {
                let lines: Vec<&str> = text.lines().collect();
                value["log_tail"] = lines[lines.len().saturating_sub(100)..].join("\n").into();
                value["log_url"] = url.into();
            }
        }
        Ok(json_result(&value, true))
    }
}

#[tool_handler(router = self.tool_router)]
impl ServerHandler for HearthMcp {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(Implementation::new("hearth", env!("CARGO_PKG_VERSION")))
            .with_instructions(
                "hearth: the fleet's Nix binary cache and NixOS build host. list_repos shows what can be built; \
                 fleet shows every host's last build, generations and changes; build_log says why a host's \
                 build failed; cache_status checks whether a path or a host's last build is in the cache; build (when enabled) \
                 builds hosts before they are deployed: builds take minutes to hours, so use wait: false and \
                 build_status when your client's request timeout is shorter.",
            )
    }
}

/// GET `url` with hyper's client; returns the status and the body as text.
async fn http_get(url: &str) -> Result<(u16, String), String> {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Empty<bytes::Bytes>>();
    let uri: hyper::Uri = url.parse().map_err(|e| format!("bad URL: {e}"))?;
    let resp = tokio::time::timeout(Duration::from_secs(30), client.get(uri))
        .await
        .map_err(|_| "timed out".to_owned())?
        .map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    // A build log may be large: at most 16 MiB is read.
    let body =
        http_body_util::Limited::new(resp.into_body(), 16 << 20).collect().await.map_err(|e| e.to_string())?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// Serves MCP on stdin/stdout until the client closes it.
pub async fn run(args: McpArgs) -> anyhow::Result<()> {
    let config = match &args.config {
        Some(path) => Some(Config::load(Some(path))?),
        None => None,
    };
    let server = HearthMcp::new(&args, config);
    let (input, output, framing) = framing::frame(tokio::io::stdin(), tokio::io::stdout());
    let service = server.serve((input, output)).await?;
    service.waiting().await?;
    // Everything the server said reaches stdout before the process ends.
    let _ = framing.await;
    Ok(())
}
