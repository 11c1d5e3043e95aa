//! The binary cache over HTTP (axum): routes, shared state, metrics middleware and serving on
//! TCP or a unix socket.
//!
//! Architecture invariant: handlers are thin (parse with `nix::http_path`, ask the `Store`,
//! render) and know nothing of SQL, daemon opcodes or NATS. This module never calls the builder.

mod cache_info;
pub mod error;
mod files;
mod fleet;
mod nar;
mod narinfo;
pub mod range;
pub mod slots;

#[cfg(test)]
mod tests {
    #[test]
    fn route_labels_are_a_fixed_set() {
        use super::route_label;
        assert_eq!(route_label(Some("/{file}"), "/abc.narinfo"), "narinfo");
        assert_eq!(route_label(Some("/{file}"), "/abc.ls"), "ls");
        assert_eq!(route_label(Some("/{file}"), "/favicon.ico"), "other");
        assert_eq!(route_label(None, "/a/b/c"), "other");
        assert_eq!(route_label(Some("/nar/{file}"), "/nar/x.nar"), "nar");
    }
}

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio_util::sync::CancellationToken;

use crate::metrics::{Metrics, Route, RouteStatus};
use crate::nix::signing::SecretKey;
use crate::store::Store;

/// Cache settings the handlers need.
#[derive(Debug, Clone)]
pub struct CacheSettings {
    pub priority: u32,
    /// `Some(level)` serves zstd-compressed NARs (and narinfos that say so).
    pub zstd_level: Option<i32>,
}

/// How many response streams may run at once, and how they are shared (see [`slots`]).
#[derive(Debug, Clone)]
pub struct StreamLimits {
    /// NAR downloads (plain or compressed) and build logs together.
    pub max_nar_streams: usize,
    /// Compressed NAR downloads, each holding an encoder's memory.
    pub max_zstd_streams: usize,
    /// Build log downloads, each holding a decompressor's memory.
    pub max_log_streams: usize,
    /// The share of each bound one client address may hold.
    pub client_share: f64,
    /// How long a stream's client must have read nothing before the stream may be made to give
    /// its slot to a new request.
    pub min_idle: Duration,
    /// How long a request at a full bound waits for a slot before it gets 503.
    pub max_wait: Duration,
    /// Proxies whose `X-Forwarded-For` names the client (a unix socket's peer always is one).
    pub trusted_proxies: Vec<std::net::IpAddr>,
}

impl Default for StreamLimits {
    fn default() -> Self {
        Self {
            max_nar_streams: 512,
            max_zstd_streams: 16,
            max_log_streams: 32,
            client_share: 0.25,
            min_idle: Duration::from_secs(5),
            max_wait: Duration::from_secs(10),
            trusted_proxies: vec![std::net::Ipv4Addr::LOCALHOST.into(), std::net::Ipv6Addr::LOCALHOST.into()],
        }
    }
}

/// The stream bounds every handler shares.
pub(crate) struct StreamSlots {
    pub(crate) nar: Arc<slots::Slots>,
    pub(crate) zstd: Arc<slots::Slots>,
    pub(crate) log: Arc<slots::Slots>,
    pub(crate) trusted_proxies: Vec<std::net::IpAddr>,
}

impl StreamSlots {
    fn new(limits: &StreamLimits, metrics: &Metrics) -> Self {
        let bound = |capacity, name: &str| {
            let evictions =
                metrics.stream_evictions.get_or_create(&crate::metrics::Bound { bound: name.into() }).clone();
            slots::Slots::new(capacity, limits.client_share, limits.min_idle, limits.max_wait, evictions)
        };
        Self {
            nar: bound(limits.max_nar_streams, "nar"),
            zstd: bound(limits.max_zstd_streams, "zstd"),
            log: bound(limits.max_log_streams, "log"),
            trusted_proxies: limits.trusted_proxies.clone(),
        }
    }

    /// Slots in `bounds` (in order) for the client of a request on `conn`; the first refusal
    /// is a 503 naming `what`.
    pub(crate) async fn acquire(
        &self,
        conn: Option<&slots::Conn>,
        headers: &axum::http::HeaderMap,
        bounds: &[&Arc<slots::Slots>],
        what: &'static str,
    ) -> Result<Vec<slots::Slot>, error::HttpError> {
        // A request that did not come through `serve` (a router test) is a local client whose
        // connection cannot be closed.
        let fallback = slots::Conn::new(None);
        let conn = conn.unwrap_or(&fallback);
        let client = conn.client(headers, &self.trusted_proxies);
        let mut held = Vec::with_capacity(bounds.len());
        for bound in bounds {
            let slot = bound.acquire(client, &conn.close).await.map_err(|refused| match refused {
                slots::Refused::Full => error::HttpError::Busy(what),
                slots::Refused::ClientShare => error::HttpError::Busy("too many downloads from one address"),
            })?;
            held.push(slot);
        }
        Ok(held)
    }
}

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    pub store: Arc<Store>,
    pub keys: Arc<Vec<SecretKey>>,
    pub metrics: Arc<Metrics>,
    pub cache: Arc<CacheSettings>,
    pub(crate) narinfos: Arc<narinfo::NarinfoCache>,
    pub(crate) streams: Arc<StreamSlots>,
    /// The builder's record, for the fleet page (empty without a builder).
    pub fleet: Arc<crate::fleet::Fleet>,
    /// The fleet page, rendered once per change of the record.
    pub(crate) page: Arc<fleet::PageCache>,
    /// With `[bucket] read_through`: paths not in the local store are answered from it.
    pub bucket: Option<crate::bucket::Bucket>,
    /// Narinfos found in the bucket (as this cache serves them), and when.
    pub(crate) bucket_narinfos: Arc<
        quick_cache::sync::Cache<
            crate::nix::store_path::StorePathHash,
            (std::time::Instant, String),
            narinfo::TextBytes,
        >,
    >,
    /// Local copies of the bucket's NARs, each fetched once (`[bucket] read_cache_size`).
    pub bucket_copies: Option<Arc<crate::bucket::read_cache::ReadCache>>,
}

impl AppState {
    pub fn new(
        store: Arc<Store>,
        keys: Vec<SecretKey>,
        metrics: Arc<Metrics>,
        cache: CacheSettings,
        streams: StreamLimits,
        fleet: Arc<crate::fleet::Fleet>,
    ) -> Self {
        Self {
            streams: Arc::new(StreamSlots::new(&streams, &metrics)),
            store,
            keys: Arc::new(keys),
            metrics,
            cache: Arc::new(cache),
            narinfos: Arc::new(narinfo::NarinfoCache::new(narinfo::NARINFO_CACHE_BYTES)),
            fleet,
            page: Arc::new(fleet::PageCache::new()),
            bucket: None,
            bucket_narinfos: Arc::new(quick_cache::sync::Cache::with_weighter(
                50_000,
                narinfo::BUCKET_NARINFO_CACHE_BYTES,
                narinfo::TextBytes,
            )),
            bucket_copies: None,
        }
    }
}

/// How long a handler may take to produce the response head.
const HANDLER_TIMEOUT: Duration = Duration::from_secs(60);

/// The cache's routes, with metrics; `/metrics` included.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/", get(fleet::index))
        .route("/fleet.json", get(fleet::json))
        .route("/nix-cache-info", get(cache_info::get))
        .route("/health", get(cache_info::health))
        .route("/version", get(cache_info::version))
        .route("/nar/{file}", get(nar::get))
        .route("/log/{file}", get(files::log))
        .route("/realisations/{file}", get(files::realisation))
        .route("/{file}", get(narinfo::get_root_file))
        .route("/metrics", get(metrics_handler))
        .fallback(|| async { error::HttpError::NotFound })
        .layer(middleware::from_fn_with_state(state.clone(), track))
        .layer(tower_http::timeout::TimeoutLayer::with_status_code(StatusCode::SERVICE_UNAVAILABLE, HANDLER_TIMEOUT))
        .with_state(state)
}

/// A router with `/metrics` only, for the separate metrics listener.
pub fn metrics_router(state: AppState) -> Router {
    Router::new().route("/metrics", get(metrics_handler)).with_state(state)
}

/// Brings a counter up to a total counted elsewhere (a cache's own atomics).
fn catch_up(counter: &prometheus_client::metrics::counter::Counter, total: u64) {
    counter.inc_by(total.saturating_sub(counter.get()));
}

/// `/metrics`: OpenMetrics for scrapers that ask for it (Prometheus does), the classic text
/// format otherwise.
async fn metrics_handler(State(state): State<AppState>, headers: axum::http::HeaderMap) -> Response {
    // One scrape at a time catches the counters up, so none is counted twice.
    static SCRAPE: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = SCRAPE.lock().unwrap_or_else(|e| e.into_inner());
    let pool = state.store.pool();
    state.metrics.daemon_pool_in_use.set(pool.in_use() as i64);
    catch_up(&state.metrics.temp_root_connections, state.store.temp_root_connections());
    state.metrics.daemon_pool_size.set(pool.size() as i64);
    for (name, bound) in [("nar", &state.streams.nar), ("zstd", &state.streams.zstd), ("log", &state.streams.log)] {
        let held = state.metrics.streams_held.get_or_create(&crate::metrics::Bound { bound: name.into() });
        held.set(bound.in_use() as i64);
    }
    catch_up(&state.metrics.fleet_watch_restarts, state.fleet.watch_restarts());
    if let Some(cache) = state.store.nar_cache() {
        let m = &state.metrics;
        let (entries, bytes) = cache.usage();
        m.nar_cache_entries.set(entries as i64);
        m.nar_cache_size.set(i64::try_from(bytes).unwrap_or(i64::MAX));
        // The store counts; the counters catch up at each scrape.
        let s = cache.stats();
        catch_up(&m.nar_cache_evictions, s.evictions.load(std::sync::atomic::Ordering::Relaxed));
        catch_up(&m.nar_cache_fills, s.fills.load(std::sync::atomic::Ordering::Relaxed));
        catch_up(&m.nar_cache_checks, s.checks.load(std::sync::atomic::Ordering::Relaxed));
        catch_up(&m.nar_cache_fill_failures, s.fill_failures.load(std::sync::atomic::Ordering::Relaxed));
        let secs = s.fill_micros.load(std::sync::atomic::Ordering::Relaxed) as f64 / 1e6;
        m.nar_cache_fill_seconds.inc_by((secs - m.nar_cache_fill_seconds.get()).max(0.0));
    }
    if let Some(copies) = &state.bucket_copies {
        let m = &state.metrics;
        let (entries, bytes) = copies.usage();
        m.bucket_read_cache_entries.set(entries as i64);
        m.bucket_read_cache_size.set(i64::try_from(bytes).unwrap_or(i64::MAX));
        let s = &copies.stats;
        catch_up(&m.bucket_read_cache_hits, s.hits.load(std::sync::atomic::Ordering::Relaxed));
        catch_up(&m.bucket_read_cache_fills, s.fills.load(std::sync::atomic::Ordering::Relaxed));
        catch_up(&m.bucket_read_cache_fill_failures, s.fill_failures.load(std::sync::atomic::Ordering::Relaxed));
    }
    let open_metrics = headers
        .get_all(header::ACCEPT)
        .iter()
        .any(|v| v.to_str().is_ok_and(|v| v.contains("application/openmetrics-text")));
    if open_metrics {
        ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], state.metrics.encode())
            .into_response()
    } else {
        ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], state.metrics.encode_prometheus_text())
            .into_response()
    }
}

/// What a request asks for, as a metric label: a small fixed set, so narinfo hit rates can be
/// told apart from listings and unknown files.
fn route_label(matched: Option<&str>, path: &str) -> &'static str {
    match matched {
        Some("/nix-cache-info") => "cache-info",
        Some("/" | "/fleet.json") => "fleet",
        Some("/nar/{file}") => "nar",
        Some("/log/{file}") => "log",
        Some("/realisations/{file}") => "realisation",
        Some("/metrics") => "metrics",
        Some("/health") => "health",
        Some("/version") => "version",
        Some("/{file}") if path.ends_with(".narinfo") => "narinfo",
        Some("/{file}") if path.ends_with(".ls") => "ls",
        _ => "other",
    }
}

async fn track(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let route = route_label(req.extensions().get::<MatchedPath>().map(|p| p.as_str()), req.uri().path()).to_owned();
    let start = Instant::now();
    let resp = next.run(req).await;
    let status = resp.status().as_u16();
    state.metrics.http_requests.get_or_create(&RouteStatus { route: route.clone(), status }).inc();
    state.metrics.http_duration.get_or_create(&Route { route }).observe(start.elapsed().as_secs_f64());
    resp
}

/// A bound listener: TCP or a unix socket.
pub enum Listener {
    Tcp(tokio::net::TcpListener),
    Unix(tokio::net::UnixListener),
}

impl Listener {
    /// A description of where it listens, for logs.
    pub fn describe(&self) -> String {
        match self {
            Listener::Tcp(l) => l.local_addr().map(|a| a.to_string()).unwrap_or_else(|_| "tcp".into()),
            Listener::Unix(l) => l
                .local_addr()
                .ok()
                .and_then(|a| a.as_pathname().map(|p| format!("unix:{}", p.display())))
                .unwrap_or_else(|| "unix".into()),
        }
    }
}

/// hyper's per-connection buffer limit (its default is about 400 KiB).
const MAX_CONN_BUF: usize = 64 * 1024;

/// Limits on client connections.
#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    /// Connections served at once; more are closed as soon as they are accepted.
    pub max_connections: usize,
    /// Time a client has to send a request's headers (slowloris protection; idle keep-alive
    /// connections are closed after it too).
    pub header_timeout: Duration,
    /// Time a client may read nothing while a response waits to be written; then the
    /// connection is closed (a stalled reader holds no stream for longer).
    pub send_timeout: Duration,
}

impl Default for ConnLimits {
    fn default() -> Self {
        Self { max_connections: 4096, header_timeout: Duration::from_secs(30), send_timeout: Duration::from_secs(60) }
    }
}

/// Serves `router` on `listener` until `cancel` fires, then stops accepting and waits for the
/// connections in flight (the caller bounds that wait). Each connection is HTTP/1.1 with a
/// header timeout, and at most `limits.max_connections` are served at once.
pub async fn serve(
    listener: Listener,
    router: Router,
    limits: ConnLimits,
    cancel: CancellationToken,
) -> std::io::Result<()> {
    match listener {
        Listener::Tcp(l) => {
            use axum::serve::ListenerExt;
            // Small responses go out at once: without it Nagle's algorithm holds a response's
            // last segment until the client's delayed ACK, ~40 ms per small NAR on a keep-alive
            // connection.
            let l = l.tap_io(|tcp| {
                if let Err(e) = tcp.set_nodelay(true) {
                    tracing::debug!(err = %e, "cannot set TCP_NODELAY");
                }
            });
            // A dual-stack socket sees IPv4 peers as IPv4-mapped IPv6 addresses: compare them as
            // the IPv4 addresses they are.
            serve_on(l, |a: &std::net::SocketAddr| Some(a.ip().to_canonical()), router, limits, cancel).await
        }
        Listener::Unix(l) => serve_on(l, |_: &tokio::net::unix::SocketAddr| None, router, limits, cancel).await,
    }
}

/// Wraps a connection so that a write that makes no progress for `timeout` fails (and the
/// connection closes): a client that stops reading cannot hold a response forever.
fn with_send_timeout<T>(io: T, timeout: Duration) -> std::pin::Pin<Box<tokio_io_timeout::TimeoutStream<T>>>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite,
{
    let mut stream = tokio_io_timeout::TimeoutStream::new(io);
    stream.set_write_timeout(Some(timeout));
    Box::pin(stream)
}

async fn serve_on<L>(
    mut listener: L,
    peer_ip: fn(&L::Addr) -> Option<std::net::IpAddr>,
    router: Router,
    limits: ConnLimits,
    cancel: CancellationToken,
) -> std::io::Result<()>
where
    L: axum::serve::Listener,
    L::Io: Send + 'static,
{
    use hyper_util::rt::{TokioIo, TokioTimer};
    let permits = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    loop {
        // `Listener::accept` retries (with a pause) on errors such as running out of file
        // descriptors, so it only returns connections.
        let (io, addr) = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = cancel.cancelled() => break,
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            tracing::warn!(max = limits.max_connections, "connection limit reached; closing a new connection");
            drop(io);
            continue;
        };
        // Every request on the connection knows its peer, and how to close it.
        let info = slots::Conn::new(peer_ip(&addr));
        let close = info.close.clone();
        let service = hyper_util::service::TowerToHyperService::new(tower::ServiceExt::map_request(
            router.clone(),
            move |mut req: axum::http::Request<hyper::body::Incoming>| {
                req.extensions_mut().insert(info.clone());
                req
            },
        ));
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_timeout)
            .keep_alive(true)
            // Bounds what hyper buffers per connection (request head, and response bytes it
            // copies instead of queueing): NAR chunks are already bounded by our own budget.
            .max_buf_size(MAX_CONN_BUF)
            .serve_connection(TokioIo::new(with_send_timeout(io, limits.send_timeout)), service);
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            tokio::select! {
                ended = conn => if let Err(e) = ended {
                    tracing::debug!(err = %e, "connection ended with an error");
                },
                // Its stream gave its slot to a new request: dropping the connection closes it.
                _ = close.cancelled() => tracing::debug!("closed an idle stream's connection for a new request"),
            }
            drop(permit);
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}
