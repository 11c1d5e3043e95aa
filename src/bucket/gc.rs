//! `hearth bucket gc`: what the bucket keeps is the closure of every kept generation of every
//! host in the fleet record (all builders' hosts, with a shared record), followed through the
//! bucket's own narinfos, plus whatever was written within a grace period (an upload or a build
//! in progress). Everything else goes: narinfos first (so no narinfo ever points at a deleted
//! NAR), then the NARs no kept narinfo names.

use std::collections::HashSet;

use super::{Bucket, BucketError, narinfo_key};
use crate::nix::narinfo::NarInfo;

/// What a collection found and did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// Store paths kept as live (reachable from a kept generation).
    pub live: usize,
    /// Objects kept only because they are recent.
    pub recent: usize,
    pub narinfos_deleted: usize,
    pub nars_deleted: usize,
    pub bytes_deleted: u64,
}

/// The hash part of a store path (`/nix/store/<hash>-<name>`).
fn hash_of(path: &str) -> Option<&str> {
    let base = path.rsplit('/').next()?;
    let hash = base.split('-').next()?;
    (hash.len() == 32).then_some(hash)
}

/// Collects `bucket`, keeping the closures of `roots` (store paths) and objects written after
/// `keep_after` (unix seconds). With `dry_run` nothing is deleted; the report says what would be.
pub async fn collect(bucket: &Bucket, roots: &[String], keep_after: i64, dry_run: bool) -> Result<Report, BucketError> {
    let objects = bucket.list().await?;
    let mut report = Report::default();
    // The live closure, through the bucket's narinfos. A narinfo that cannot be read for a
    // reason other than its absence stops the collection: nothing is deleted on a guess.
    let mut live: HashSet<String> = HashSet::new();
    let mut live_nars: HashSet<String> = HashSet::new();
    let mut todo: Vec<String> = roots.iter().filter_map(|p| hash_of(p)).map(str::to_owned).collect();
    while let Some(hash) = todo.pop() {
        if !live.insert(hash.clone()) {
            continue;
        }
        let Some(text) = bucket.get(&narinfo_key(&hash)).await? else { continue };
        let Some(info) = NarInfo::parse(&String::from_utf8_lossy(&text)) else { continue };
        live_nars.insert(info.url.split('?').next().unwrap_or(&info.url).to_owned());
        todo.extend(info.references.iter().filter_map(|r| hash_of(r)).map(str::to_owned));
    }
    report.live = live.len();
    // Narinfos: a dead one goes unless recent; a recent one keeps its NAR.
    let mut doomed_narinfos = Vec::new();
    for (key, size, at) in &objects {
        let Some(hash) = key.strip_suffix(".narinfo") else { continue };
        if live.contains(hash) {
            continue;
        }
        if *at >= keep_after {
            report.recent += 1;
            if let Some(text) = bucket.get(key).await?
                && let Some(info) = NarInfo::parse(&String::from_utf8_lossy(&text))
            {
                live_nars.insert(info.url.split('?').next().unwrap_or(&info.url).to_owned());
            }
            continue;
        }
        doomed_narinfos.push((key.clone(), *size));
    }
    for (key, size) in &doomed_narinfos {
        if !dry_run {
            bucket.delete(key).await?;
        }
        report.narinfos_deleted += 1;
        report.bytes_deleted += size;
    }
    for (key, size, at) in &objects {
        if !key.starts_with("nar/") || live_nars.contains(key) {
            continue;
        }
        if *at >= keep_after {
            report.recent += 1;
            continue;
        }
        if !dry_run {
            bucket.delete(key).await?;
        }
        report.nars_deleted += 1;
        report.bytes_deleted += size;
    }
    Ok(report)
}

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
    #[arg(long, default_value = "1d", value_parser = crate::builder::cli::parse_duration)]
    pub grace: std::time::Duration,
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
            crate::fleet::read_bucket(&kv).await
        }
    };
    anyhow::ensure!(!hosts.is_empty(), "the fleet record is empty: refusing to collect everything");
    Ok(hosts.values().flat_map(|h| h.generations.iter().map(|g| g.path.clone())).collect())
}

pub async fn run(args: GcArgs) -> anyhow::Result<()> {
    use anyhow::Context;
    let config = crate::config::Config::load(Some(&args.config))?;
    let b = config.bucket.as_ref().context("no [bucket] in the configuration")?;
    let bucket = Bucket::open(b)?;
    let roots = kept_systems(&config).await?;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
    let keep_after = now - i64::try_from(args.grace.as_secs()).unwrap_or(i64::MAX);
    let r = collect(&bucket, &roots, keep_after, args.dry_run).await?;
    let verb = if args.dry_run { "would delete" } else { "deleted" };
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_of_paths_and_basenames() {
        assert_eq!(hash_of("/nix/store/0qmwlny41nap6ccq7xi471zj6m58b530-a"), Some("0qmwlny41nap6ccq7xi471zj6m58b530"));
        assert_eq!(hash_of("0qmwlny41nap6ccq7xi471zj6m58b530-a"), Some("0qmwlny41nap6ccq7xi471zj6m58b530"));
        assert_eq!(hash_of("/nix/store/short-a"), None);
    }
}
