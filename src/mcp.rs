//! `hearth mcp`: a Model Context Protocol server over stdio (the official `rmcp` SDK) that lets an
//! AI assistant list the builder's repos, check what the cache holds, and (with `--enable-builds`)
//! build hosts and read the per-host summary.
//!
//! A client of the cache (HTTP) and of the builder (NATS), like `hearth build`: it never touches
//! the store. Invalid arguments are refused as the builder would refuse them, as MCP errors.

use std::path::PathBuf;
use std::time::Duration;

use http_body_util::BodyExt;
use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::{CallToolResult, ContentBlock, ServerCapabilities, ServerConfig};
use rmcp::{ErrorData, ServerHandler, ServiceExt, schemars, tool, tool_handler, tool_router};
use serde::Deserialize;

use crate::builder::cli::{NatsArgs, parse_duration, request_build, validate};
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
    /// A host name of the repo's flake, or `all`.
    pub target: String,
    /// A branch to build instead of the repo's default.
    #[serde(default)]
    pub branch: Option<String>,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct CacheStatusParams {
    /// A store path (`/nix/store/<hash>-<name>`) or its 32-character hash.
    #[serde(default)]
    pub store_path: Option<String>,
    /// With `host`: check that host's last successful build.
    #[serde(default)]
    pub repo: Option<String>,
    #[serde(default)]
    pub host: Option<String>,
}

#[derive(Clone)]
pub struct HearthMcp {
    enable_builds: bool,
    repos: Vec<RepoConfig>,
    gcroots_dir: PathBuf,
    store_dir: String,
    cache_url: String,
    nats: NatsArgs,
    build_timeout: Duration,
    tool_router: ToolRouter<Self>,
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
            repos,
            gcroots_dir,
            store_dir,
            cache_url: args.cache_url.trim_end_matches('/').to_owned(),
            nats: args.nats.clone(),
            build_timeout: args.build_timeout,
            tool_router: Self::tool_router(),
        }
    }

    /// The repos the builder accepts, from hearth's configuration.
    #[tool(description = "List the flake repos the hearth builder accepts (name, flake URL, default branch).")]
    async fn list_repos(&self) -> Result<CallToolResult, ErrorData> {
        let repos: Vec<_> =
            self.repos.iter().map(|r| serde_json::json!({"name": r.name, "url": r.url, "branch": r.branch})).collect();
        Ok(json_result(&serde_json::json!({ "repos": repos }), true))
    }

    #[tool(
        description = "Build a repo's NixOS host (or `all` hosts) on the build host and wait for the result: a per-host summary with output paths, or errors with the build log's tail. Only when hearth mcp runs with --enable-builds."
    )]
    async fn build(&self, Parameters(p): Parameters<BuildParams>) -> Result<CallToolResult, ErrorData> {
        if !self.enable_builds {
            return Err(ErrorData::invalid_request("builds are disabled: start `hearth mcp --enable-builds`", None));
        }
        validate(&p.repo, &p.target, p.branch.as_deref()).map_err(|(_, m)| invalid(m))?;
        if !self.repos.is_empty() && !self.repos.iter().any(|r| r.name == p.repo) {
            return Err(invalid(format!("unknown repo `{}` (see list_repos)", p.repo)));
        }
        let client = self.nats.connect("hearth-mcp").await.map_err(|(_, m)| ErrorData::internal_error(m, None))?;
        let reply =
            request_build(&client, &p.repo, &p.target, p.branch.as_deref(), None, self.build_timeout, |_, _| {})
                .await
                .map_err(|(_, m)| ErrorData::internal_error(m, None))?;
        let value = serde_json::to_value(&reply).unwrap_or_default();
        Ok(json_result(&value, reply.status == Status::Completed))
    }

    #[tool(
        description = "Is a store path in the binary cache? Give `store_path` (a /nix/store path or its hash), or `repo` and `host` to check that host's last successful build."
    )]
    async fn cache_status(&self, Parameters(p): Parameters<CacheStatusParams>) -> Result<CallToolResult, ErrorData> {
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
                let link = self.gcroots_dir.join(repo).join(host);
                let target = std::fs::read_link(&link).map_err(|_| {
                    invalid(format!("no successful build of {host} in {repo} is recorded on this machine"))
                })?;
                let target = target.to_string_lossy().into_owned();
                let path = StorePath::from_absolute(&self.store_dir, &target)
                    .ok_or_else(|| ErrorData::internal_error("the GC root points outside the store", None))?;
                (path.hash(), Some(target))
            }
            _ => return Err(invalid("give either `store_path`, or `repo` and `host`")),
        };
        let url = format!("{}/{hash}.narinfo", self.cache_url);
        let (status, body) =
            http_get(&url).await.map_err(|e| ErrorData::internal_error(format!("{url}: {e}"), None))?;
        let value = match status {
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
        Ok(json_result(&value, true))
    }
}

#[tool_handler(router = self.tool_router)]
impl ServerHandler for HearthMcp {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build()).with_instructions(
            "hearth: the fleet's Nix binary cache and NixOS build host. list_repos shows what can be built; \
             cache_status checks whether a path or a host's last build is in the cache; build (when enabled) \
             builds hosts before they are deployed.",
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
    let body = resp.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// Serves MCP on stdin/stdout until the client closes it.
pub async fn run(args: McpArgs) -> anyhow::Result<()> {
    let config = match &args.config {
        Some(path) => Some(Config::load(Some(path))?),
        None => None,
    };
    let server = HearthMcp::new(&args, config);
    let service = server.serve(rmcp::transport::stdio()).await?;
    service.waiting().await?;
    Ok(())
}
