//! `hearth bucket gc` and `hearth bucket push`: the bucket's command-line side (configuration,
//! the fleet record's kept generations, reporting); the work is `gc.rs`'s and `upload.rs`'s.

use super::Bucket;
use super::gc::collect;

/// `hearth bucket gc`.
#[derive(Debug, clap::Args)]
pub struct GcArgs {
    /// The configuration with the `[bucket]` (and the `[builder]` whose record says what is kept).
    #[arg(long, env = "HEARTH_CONFIG")]
    pub config: std::path::PathBuf,
    /// Say what would be deleted; delete nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Objects written within this long are kept whatever they are (uploads in progress), e.g.
    /// `1d`, `6h`, `0s`.
    #[arg(long, default_value = "1d", value_parser = crate::builder::client::parse_duration)]
    pub grace: std::time::Duration,
    /// Collect only if no collection of this bucket ended within this long, and none runs now,
    /// e.g. `1d`: every builder's timer may run it, and the fleet's bucket is collected once.
    #[arg(long, value_parser = crate::builder::client::parse_duration)]
    pub once_per: Option<std::time::Duration>,
}

/// Every kept generation's system in the fleet record: the local file, or the shared bucket
/// when the builder's queue is JetStream.
async fn kept_systems(config: &crate::config::Config) -> anyhow::Result<Vec<String>> {
    use anyhow::Context;
    let builder =
        config.builder.as_ref().context("the record of kept generations is the builder's: configure [builder]")?;
    let hosts = match builder.queue {
        crate::builder::config::QueueKind::Core => {
            let file = config.state_dir.join("fleet.json");
            anyhow::ensure!(file.exists(), "no fleet record at {}: nothing says what to keep", file.display());
            crate::fleet::Fleet::load(Some(file)).snapshot()
        }
        crate::builder::config::QueueKind::JetStream => {
            let client = builder
                .auth
                .options()
                .await?
                .name("hearth-bucket-gc")
                .connect(&builder.nats_url)
                .await
                .with_context(|| format!("cannot connect to {}", builder.nats_url))?;
            let js = async_nats::jetstream::new(client);
            let kv =
                js.get_key_value(&builder.jetstream.bucket).await.context("cannot open the shared fleet record")?;
            // A record read only in part would delete the systems of the hosts it missed.
            crate::fleet::read_bucket(&kv).await.map_err(anyhow::Error::msg).context("refusing to collect")?
        }
    };
    anyhow::ensure!(!hosts.is_empty(), "the fleet record is empty: refusing to collect everything");
    Ok(hosts.values().flat_map(|h| h.generations.iter().map(|g| g.path.clone())).collect())
}

pub async fn gc(args: GcArgs) -> anyhow::Result<()> {
    use anyhow::Context;
    let config = crate::config::Config::load(Some(&args.config))?;
    let b = config.bucket.as_ref().context("no [bucket] in the configuration")?;
    let bucket = Bucket::open(b)?.with_journal(super::journal_dir(&config.state_dir));
    // A collection that deletes holds the lease from before it reads the record to its end, so
    // that no push adopts what it is about to delete (ARCHITECTURE.md, the gc invariant).
    if let Some(period) = args.once_per.filter(|_| !args.dry_run)
        && let Some(why) = done_this_period(&bucket, period).await?
    {
        println!("nothing to do: {why}");
        return Ok(());
    }
    if !args.dry_run {
        // A record that cannot be read whole stops it before it touches the bucket at all.
        kept_systems(&config).await?;
        take_lease(&bucket).await?;
    }
    let collected = collect_kept(&config, &bucket, &args).await;
    if !args.dry_run
        && let Err(e) = bucket.delete(super::GC_LEASE).await
    {
        tracing::warn!(err = %e, "cannot release the gc lease; pushes wait until it expires");
    }
    let (r, roots) = collected?;
    if !args.dry_run {
        // Parts of uploads a crash cut short: journaled longer ago than the grace, and than
        // any upload lasts (the builder beside it may be uploading now).
        let aborted = bucket.abort_stale_uploads(args.grace.max(STALE_UPLOAD)).await;
        if aborted > 0 {
            println!("aborted {aborted} multipart upload(s) a stop left behind");
        }
    }
    if !r.unreadable_roots.is_empty() {
        println!(
            "collected nothing: {} kept system(s) are not wholly in the bucket (a push under way, or one that failed; the next build pushes them again), so their closures cannot be read: {}",
            r.unreadable_roots.len(),
            r.unreadable_roots.join(", ")
        );
        return Ok(());
    }
    if !args.dry_run {
        let done = serde_json::json!({ "finished_at": crate::utc::now() }).to_string();
        if let Err(e) = bucket.put(super::GC_DONE, done.into()).await {
            tracing::warn!(err = %e, "cannot note the collection's end; the next `--once-per` run collects again");
        }
    }
    let verb = if args.dry_run { "would delete" } else { "deleted" };
    if args.dry_run {
        for key in &r.deleted {
            println!("would delete {key}");
        }
    }
    println!(
        "{verb} {} narinfo(s) and {} NAR(s), {} bytes; kept {} live path(s) of {} generation(s), and {} recent object(s)",
        r.narinfos_deleted,
        r.nars_deleted,
        r.bytes_deleted,
        r.live,
        roots.len(),
        r.recent
    );
    Ok(())
}

/// How old a journaled multipart upload must be before gc aborts it (the uploader aborts its
/// own at startup, when none of its uploads is going on).
const STALE_UPLOAD: std::time::Duration = std::time::Duration::from_secs(6 * 3600);

/// Why this period's collection needs no other: one runs now (another builder's timer), or one
/// ended within `period`.
async fn done_this_period(bucket: &Bucket, period: std::time::Duration) -> anyhow::Result<Option<String>> {
    let now = crate::utc::now();
    if let Some(started) = super::gc_lease(bucket, now).await? {
        return Ok(Some(format!(
            "another `hearth bucket gc` has been collecting since {}",
            crate::utc::minute(started)
        )));
    }
    let finished = super::gc_stamp(bucket, super::GC_DONE, "finished_at").await?;
    let within = i64::try_from(period.as_secs()).unwrap_or(i64::MAX);
    Ok(finished.filter(|at| now - at < within).map(|at| {
        format!("the bucket was collected at {} ({}s ago), within --once-per", crate::utc::minute(at), now - at)
    }))
}

/// Takes the bucket's gc lease: refused while another gc holds one in force.
async fn take_lease(bucket: &Bucket) -> anyhow::Result<()> {
    let now = crate::utc::now();
    if let Some(started) = super::gc_lease(bucket, now).await? {
        anyhow::bail!(
            "another `hearth bucket gc` has held the bucket since {} ({}s ago); if it died, its lease `{}` expires {}s after it began",
            crate::utc::minute(started),
            now - started,
            super::GC_LEASE,
            super::GC_LEASE_TTL
        );
    }
    let lease = serde_json::json!({ "started_at": now }).to_string();
    bucket.put(super::GC_LEASE, lease.into()).await?;
    Ok(())
}

/// The record's kept systems (read once the lease is held) and the collection of the rest.
async fn collect_kept(
    config: &crate::config::Config,
    bucket: &Bucket,
    args: &GcArgs,
) -> anyhow::Result<(super::gc::Report, Vec<String>)> {
    let roots = kept_systems(config).await?;
    let now = crate::utc::now();
    let keep_after = now - i64::try_from(args.grace.as_secs()).unwrap_or(i64::MAX);
    Ok((collect(bucket, &roots, keep_after, args.dry_run).await?, roots))
}

/// `hearth bucket push`.
#[derive(Debug, clap::Args)]
pub struct PushArgs {
    /// The configuration with the `[bucket]` and the signing keys.
    #[arg(long, env = "HEARTH_CONFIG")]
    pub config: std::path::PathBuf,
    /// Store paths whose closures to push (what the bucket has already is skipped).
    #[arg(required = true)]
    pub paths: Vec<String>,
}

/// Pushes the closures of store paths that are already built (a bucket seeded, a system built
/// elsewhere) exactly as the builder pushes its own, and waits until they are up.
pub async fn push(args: PushArgs) -> anyhow::Result<()> {
    use anyhow::Context;
    let config = crate::config::Config::load(Some(&args.config))?;
    let b = config.bucket.as_ref().context("no [bucket] in the configuration")?;
    anyhow::ensure!(!config.keys.is_empty(), "pushing needs a signing key (sign_key_paths)");
    let store = std::sync::Arc::new(crate::store::Store::open(config.store.clone())?);
    let metrics = std::sync::Arc::new(crate::metrics::Metrics::new(&[]));
    let uploader = super::upload::Uploader::new(
        Bucket::open(b)?.with_journal(super::journal_dir(&config.state_dir)),
        store.clone(),
        config.keys.clone(),
        b.zstd_level,
        metrics.clone(),
        &config.state_dir,
    );
    uploader.start(b.upload_concurrency);
    let mut batches = Vec::new();
    for path in &args.paths {
        let p = crate::nix::store_path::StorePath::from_absolute(store.store_dir(), path)
            .with_context(|| format!("`{path}` is not a store path"))?;
        let closure = store.closure(&p).await?.with_context(|| format!("{path} is not in the store"))?;
        batches.push(uploader.push(&closure, b.upload_concurrency));
    }
    let (mut already, mut total, mut failed) = (0, 0, 0);
    for batch in batches {
        let end = batch.finished().await;
        (already, total, failed) = (already + end.present - end.uploaded, total + end.total, failed + end.failed);
    }
    println!(
        "pushed {} of {total} path(s) ({already} already there), {} bytes; {failed} failed",
        total - already - failed,
        metrics.bucket_upload_bytes.get()
    );
    anyhow::ensure!(failed == 0, "{failed} path(s) could not be uploaded");
    Ok(())
}
