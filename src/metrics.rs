//! Prometheus metrics for the cache and the builder: one [`Metrics`] built at startup, shared by
//! `Arc`, rendered by [`Metrics::encode`].
//!
//! Labels are route templates, status codes, configured repo and host names: never hashes or
//! request paths, so the series count stays bounded.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteStatus {
    pub route: String,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Route {
    pub route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RepoStatus {
    pub repo: String,
    pub status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RepoHostStatus {
    pub repo: String,
    pub host: String,
    pub status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RepoHost {
    pub repo: String,
    pub host: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Bound {
    pub bound: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Repo {
    pub repo: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Builder {
    pub builder: String,
}

fn duration_histogram() -> Histogram {
    Histogram::new([
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
    ])
}

fn build_histogram() -> Histogram {
    Histogram::new([5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0, 7200.0, 14400.0])
}

/// Every metric hearth exports.
pub struct Metrics {
    registry: Registry,
    pub http_requests: Family<RouteStatus, Counter>,
    pub http_duration: Family<Route, Histogram, fn() -> Histogram>,
    pub nar_bytes_sent: Counter,
    pub nars_in_flight: Gauge,
    pub stream_evictions: Family<Bound, Counter>,
    pub streams_held: Family<Bound, Gauge>,
    pub daemon_pool_in_use: Gauge,
    pub daemon_pool_size: Gauge,
    pub temp_root_connections: Counter,
    pub builds: Family<RepoStatus, Counter>,
    pub build_hosts: Family<RepoHostStatus, Counter>,
    pub build_duration: Family<RepoHost, Histogram, fn() -> Histogram>,
    pub build_last: Family<Repo, Gauge>,
    pub build_last_success: Family<Repo, Gauge>,
    pub host_last_success: Family<RepoHost, Gauge>,
    pub builder_nats_connected: Gauge,
    /// 1 while the builder takes requests (subscribed or consuming), 0 before and after.
    pub builder_ready: Gauge,
    pub fleet_builder_seen: Family<Builder, Gauge>,
    pub build_queue: Gauge,
    pub build_in_progress: Gauge,
    pub build_rejected: Family<Repo, Counter>,
    pub nar_cache_hits: Counter,
    pub nar_cache_misses: Counter,
    pub nar_cache_bytes_sent: Counter,
    pub nar_cache_entries: Gauge,
    pub nar_cache_size: Gauge,
    pub nar_cache_evictions: Counter,
    pub nar_cache_fills: Counter,
    pub nar_cache_checks: Counter,
    pub fleet_watch_restarts: Counter,
    pub nar_cache_fill_failures: Counter,
    pub nar_cache_fill_seconds: Counter<f64, std::sync::atomic::AtomicU64>,
    pub host_closure_bytes: Family<RepoHost, Gauge>,
    pub host_closure_paths: Family<RepoHost, Gauge>,
    pub bucket_upload_bytes: Counter,
    pub bucket_upload_objects: Counter,
    pub bucket_upload_failures: Counter,
    pub bucket_upload_queue: Gauge,
    pub bucket_read_cache_hits: Counter,
    pub bucket_read_cache_fills: Counter,
    pub bucket_read_cache_fill_failures: Counter,
    pub bucket_read_cache_entries: Gauge,
    pub bucket_read_cache_size: Gauge,
    pub start_time: Gauge,
}

impl Metrics {
    /// Registers every family. `repos` are the configured builder repos, whose series start at 0.
    pub fn new(repos: &[String]) -> Self {
        let mut registry = Registry::default();
        let http_requests = Family::<RouteStatus, Counter>::default();
        registry.register("hearth_http_requests", "HTTP requests by route template and status", http_requests.clone());
        let http_duration = Family::<Route, Histogram, fn() -> Histogram>::new_with_constructor(duration_histogram);
        registry.register("hearth_http_request_duration_seconds", "Time to the response head", http_duration.clone());
        let nar_bytes_sent = Counter::default();
        registry.register("hearth_nar_sent_bytes", "NAR body bytes written to clients", nar_bytes_sent.clone());
        let nars_in_flight = Gauge::default();
        registry.register("hearth_nars_in_flight", "NAR bodies being streamed", nars_in_flight.clone());
        let stream_evictions = Family::<Bound, Counter>::default();
        registry.register(
            "hearth_stream_evictions",
            "Streams whose client read nothing that gave their slot to a new request, by bound (nar, zstd, log)",
            stream_evictions.clone(),
        );
        let streams_held = Family::<Bound, Gauge>::default();
        registry.register(
            "hearth_streams_held",
            "Stream slots held now, by bound (nar: NAR downloads and logs, zstd: compressed NARs, log: logs)",
            streams_held.clone(),
        );
        let daemon_pool_in_use = Gauge::default();
        registry.register("hearth_daemon_pool_in_use", "Nix daemon connections in use", daemon_pool_in_use.clone());
        let daemon_pool_size = Gauge::default();
        registry.register("hearth_daemon_pool_size", "Nix daemon connection pool size", daemon_pool_size.clone());
        let temp_root_connections = Counter::default();
        registry.register(
            "hearth_daemon_temp_root_connections",
            "Nix daemon connections opened to hold temp roots (opened ahead of need, off the request path)",
            temp_root_connections.clone(),
        );

        let builds = Family::<RepoStatus, Counter>::default();
        registry.register("homelab_deploy_builds", "Build requests finished, by repo and status", builds.clone());
        let build_hosts = Family::<RepoHostStatus, Counter>::default();
        registry.register(
            "homelab_deploy_build_host",
            "Host builds finished, by repo, host and status",
            build_hosts.clone(),
        );
        let build_duration = Family::<RepoHost, Histogram, fn() -> Histogram>::new_with_constructor(build_histogram);
        registry.register(
            "homelab_deploy_build_duration_seconds",
            "Duration of one host build, by repo and host",
            build_duration.clone(),
        );
        let build_last = Family::<Repo, Gauge>::default();
        registry.register(
            "homelab_deploy_build_last_timestamp",
            "Unix time of the last finished build",
            build_last.clone(),
        );
        let build_last_success = Family::<Repo, Gauge>::default();
        registry.register(
            "homelab_deploy_build_last_success_timestamp",
            "Unix time of the last build of the deploy branch in which a host succeeded",
            build_last_success.clone(),
        );
        let host_last_success = Family::<RepoHost, Gauge>::default();
        registry.register(
            "hearth_host_last_build_success",
            "1 if the host's last build of its repo's deploy branch succeeded, 0 if it failed (a host broken now)",
            host_last_success.clone(),
        );
        let builder_ready = Gauge::default();
        registry.register(
            "hearth_builder_ready",
            "1 while the builder takes build requests (subscribed to NATS, or consuming the JetStream queue)",
            builder_ready.clone(),
        );
        let fleet_builder_seen = Family::<Builder, Gauge>::default();
        registry.register(
            "hearth_fleet_builder_last_seen_timestamp_seconds",
            "When each builder of the shared record last said it lives (unix seconds); a builder that stopped gracefully has no series",
            fleet_builder_seen.clone(),
        );
        let builder_nats_connected = Gauge::default();
        registry.register(
            "hearth_builder_nats_connected",
            "1 while the builder is connected to NATS, 0 while it is cut off",
            builder_nats_connected.clone(),
        );
        let build_queue = Gauge::default();
        registry.register("hearth_build_queue_length", "Build requests waiting", build_queue.clone());
        let build_in_progress = Gauge::default();
        registry.register("hearth_build_in_progress", "1 while a build runs", build_in_progress.clone());
        let build_rejected = Family::<Repo, Counter>::default();
        registry.register(
            "hearth_build_rejected",
            "Build requests rejected, by repo as requested if configured",
            build_rejected.clone(),
        );

        let nar_cache_hits = Counter::default();
        registry.register(
            "hearth_nar_cache_hits",
            "NAR requests served from the hot-NAR store",
            nar_cache_hits.clone(),
        );
        let nar_cache_misses = Counter::default();
        registry.register(
            "hearth_nar_cache_misses",
            "NAR requests the hot-NAR store could have served but did not hold",
            nar_cache_misses.clone(),
        );
        let nar_cache_bytes_sent = Counter::default();
        registry.register(
            "hearth_nar_cache_sent_bytes",
            "Bytes sent from the hot-NAR store",
            nar_cache_bytes_sent.clone(),
        );
        let nar_cache_entries = Gauge::default();
        registry.register("hearth_nar_cache_entries", "Entries in the hot-NAR store", nar_cache_entries.clone());
        let nar_cache_size = Gauge::default();
        registry.register("hearth_nar_cache_bytes", "Bytes on disk in the hot-NAR store", nar_cache_size.clone());
        let nar_cache_evictions = Counter::default();
        registry.register(
            "hearth_nar_cache_evictions",
            "Entries dropped from the hot-NAR store to stay under max_size",
            nar_cache_evictions.clone(),
        );
        let nar_cache_fills = Counter::default();
        registry.register("hearth_nar_cache_fills", "Entries written to the hot-NAR store", nar_cache_fills.clone());
        let fleet_watch_restarts = Counter::default();
        registry.register(
            "hearth_fleet_record_watch_restarts",
            "Times the watch of the shared fleet record (queue = \"jetstream\") was found stalled and started again",
            fleet_watch_restarts.clone(),
        );
        let nar_cache_checks = Counter::default();
        registry.register(
            "hearth_nar_cache_checks",
            "Whole hot-NAR sends hashed against their FileHash (the first after a fill, a restart or a change of the file)",
            nar_cache_checks.clone(),
        );
        let nar_cache_fill_failures = Counter::default();
        registry.register(
            "hearth_nar_cache_fill_failures",
            "Fills of the hot-NAR store that failed (NarHash mismatch, disk full, path gone)",
            nar_cache_fill_failures.clone(),
        );
        let nar_cache_fill_seconds = Counter::<f64, std::sync::atomic::AtomicU64>::default();
        registry.register(
            "hearth_nar_cache_fill_seconds",
            "Time spent filling the hot-NAR store",
            nar_cache_fill_seconds.clone(),
        );

        let host_closure_bytes = Family::<RepoHost, Gauge>::default();
        registry.register(
            "hearth_host_closure_bytes",
            "NAR bytes of the closure of each host's newest good system",
            host_closure_bytes.clone(),
        );
        let bucket_upload_bytes = Counter::default();
        registry.register(
            "hearth_bucket_upload_bytes",
            "Bytes of compressed NARs uploaded to the bucket",
            bucket_upload_bytes.clone(),
        );
        let bucket_upload_objects = Counter::default();
        registry.register(
            "hearth_bucket_upload_objects",
            "Objects (NARs and narinfos) uploaded to the bucket",
            bucket_upload_objects.clone(),
        );
        let bucket_upload_failures = Counter::default();
        registry.register(
            "hearth_bucket_upload_failures",
            "Store paths whose upload failed after every retry (pushed again by a later build)",
            bucket_upload_failures.clone(),
        );
        let bucket_upload_queue = Gauge::default();
        registry.register(
            "hearth_bucket_upload_queue_length",
            "Store paths waiting for upload",
            bucket_upload_queue.clone(),
        );
        let bucket_read_cache_hits = Counter::default();
        registry.register(
            "hearth_bucket_read_cache_hits",
            "Read-through NAR requests answered from a local copy (finished or in the making)",
            bucket_read_cache_hits.clone(),
        );
        let bucket_read_cache_fills = Counter::default();
        registry.register(
            "hearth_bucket_read_cache_fills",
            "Bucket NARs fetched into a local copy",
            bucket_read_cache_fills.clone(),
        );
        let bucket_read_cache_fill_failures = Counter::default();
        registry.register(
            "hearth_bucket_read_cache_fill_failures",
            "Local copies of bucket NARs that failed (their readers' downloads failed)",
            bucket_read_cache_fill_failures.clone(),
        );
        let bucket_read_cache_entries = Gauge::default();
        registry.register(
            "hearth_bucket_read_cache_entries",
            "Finished local copies of bucket NARs",
            bucket_read_cache_entries.clone(),
        );
        let bucket_read_cache_size = Gauge::default();
        registry.register(
            "hearth_bucket_read_cache_bytes",
            "Bytes of finished local copies of bucket NARs",
            bucket_read_cache_size.clone(),
        );
        let host_closure_paths = Family::<RepoHost, Gauge>::default();
        registry.register(
            "hearth_host_closure_paths",
            "Store paths in the closure of each host's newest good system",
            host_closure_paths.clone(),
        );

        let start_time = Gauge::default();
        registry.register("hearth_start_time_seconds", "Unix time hearth started", start_time.clone());
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        start_time.set(i64::try_from(now).unwrap_or(i64::MAX));

        for repo in repos {
            for status in crate::fleet::BuildResult::ALL {
                let _ = builds.get_or_create(&RepoStatus { repo: repo.clone(), status: status.as_str().into() });
            }
            let label = Repo { repo: repo.clone() };
            let _ = build_last.get_or_create(&label);
            let _ = build_last_success.get_or_create(&label);
        }

        Self {
            registry,
            http_requests,
            http_duration,
            nar_bytes_sent,
            nars_in_flight,
            stream_evictions,
            streams_held,
            daemon_pool_in_use,
            daemon_pool_size,
            temp_root_connections,
            builds,
            build_hosts,
            build_duration,
            build_last,
            build_last_success,
            host_last_success,
            builder_nats_connected,
            builder_ready,
            fleet_builder_seen,
            build_queue,
            build_in_progress,
            build_rejected,
            nar_cache_hits,
            nar_cache_misses,
            nar_cache_bytes_sent,
            nar_cache_entries,
            nar_cache_size,
            nar_cache_evictions,
            nar_cache_fills,
            nar_cache_checks,
            fleet_watch_restarts,
            nar_cache_fill_failures,
            nar_cache_fill_seconds,
            host_closure_bytes,
            host_closure_paths,
            bucket_upload_bytes,
            bucket_upload_objects,
            bucket_upload_failures,
            bucket_upload_queue,
            bucket_read_cache_hits,
            bucket_read_cache_fills,
            bucket_read_cache_fill_failures,
            bucket_read_cache_entries,
            bucket_read_cache_size,
            start_time,
        }
    }

    /// The OpenMetrics text exposition.
    /// Makes a host's build series exist (at 0), so that its first failure shows as an increase.
    pub fn seed_host_series(&self, repo: &str, host: &str) {
        for status in crate::fleet::BuildResult::ALL {
            let labels =
                RepoHostStatus { repo: repo.to_owned(), host: host.to_owned(), status: status.as_str().into() };
            let _ = self.build_hosts.get_or_create(&labels);
        }
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }

    /// The classic Prometheus text format (0.0.4), for scrapers and tools that do not ask for
    /// OpenMetrics (such as `promtool check metrics`).
    pub fn encode_prometheus_text(&self) -> String {
        to_prometheus_text(&self.encode())
    }
}

/// Converts OpenMetrics text to Prometheus text 0.0.4: counters' HELP/TYPE name the `_total`
/// series, and the `# EOF` and `# UNIT` lines go.
fn to_prometheus_text(open_metrics: &str) -> String {
    let counters: std::collections::HashSet<&str> =
        open_metrics.lines().filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter")).collect();
    let mut out = String::with_capacity(open_metrics.len());
    for line in open_metrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters.contains(name).then(|| format!("{prefix}{name}_total {tail}"))
        });
        match renamed {
            Some(l) => out.push_str(&l),
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_text_names_counters_by_their_series() {
        let m = Metrics::new(&["fleet".to_owned()]);
        m.nar_bytes_sent.inc_by(7);
        let text = m.encode_prometheus_text();
        assert!(text.contains("# TYPE hearth_nar_sent_bytes_total counter\nhearth_nar_sent_bytes_total 7\n"), "{text}");
        assert!(text.contains("# HELP homelab_deploy_builds_total "), "{text}");
        assert!(text.contains("homelab_deploy_builds_total{repo=\"fleet\",status=\"success\"} 0"), "{text}");
        assert!(!text.contains("# EOF"));
        assert!(text.contains("# TYPE hearth_nars_in_flight gauge"));
    }
}
