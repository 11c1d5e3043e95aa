//! The shared record: a JetStream key-value bucket every builder of the fleet writes (one key
//! per `<repo>/<host>`, compare-and-set on its revision) and every hearth watches, with the
//! builders' presences beside the hosts (`_builder/<name>`).

use std::collections::BTreeMap;
use std::sync::Arc;

use super::file::SavedHost;
use super::{Change, Fleet, HostRecord, Hosts, PRESENCE_PREFIX, Presence, Storage, fleet_keys};

impl Fleet {
    /// Keeps the record in `bucket` from now on, shared with every builder that uses it: what
    /// is there replaces the local record, every change there shows here, and this record's
    /// changes go there. Runs until the process ends.
    pub async fn share(self: &Arc<Self>, bucket: async_nats::jetstream::kv::Store) {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(String, String, Change)>();
        self.follow(bucket.clone(), Some(tx)).await;
        let me = self.clone();
        tokio::spawn(async move {
            while let Some((repo, host, change)) = rx.recv().await {
                if let Some(written) = write_shared(&bucket, &repo, &host, &change).await {
                    // What the bucket now holds (maybe another builder's change and ours).
                    me.apply(&repo, &host, written);
                }
                me.written.send_modify(|n| *n += 1);
            }
        });
    }

    /// Shows the record in `bucket` (a hearth without a builder: it writes nothing), and every
    /// change there from now on. Runs until the process ends.
    pub async fn show(self: &Arc<Self>, bucket: async_nats::jetstream::kv::Store) {
        self.follow(bucket, None).await;
    }

    /// Reads the shared record whole, then watches it; `writer`: where this record's changes
    /// go from now on (a builder's), if anywhere.
    async fn follow(
        self: &Arc<Self>,
        bucket: async_nats::jetstream::kv::Store,
        writer: Option<tokio::sync::mpsc::UnboundedSender<(String, String, Change)>>,
    ) {
        // What the bucket holds is read first, whole: nothing is written to it before, so a
        // builder that starts never overwrites another's hosts with its own partial view.
        let (loaded, presences, problems) = read_bucket_entries(&bucket).await;
        for problem in problems {
            tracing::warn!(problem, "the shared fleet record is not all readable; showing what is");
        }
        let keys = fleet_keys([], presences.values());
        if !keys.is_empty() {
            tracing::info!(
                builders = presences.len(),
                "the fleet's builders sign with: trusted-public-keys = {} (every page lists them)",
                keys.join(" ")
            );
        }
        *self.builders.write().unwrap_or_else(|e| e.into_inner()) = presences;
        {
            let mut hosts = self.hosts.write().unwrap_or_else(|e| e.into_inner());
            *hosts = loaded;
            if let Some(tx) = writer {
                *self.storage.write().unwrap_or_else(|e| e.into_inner()) = Storage::Bucket(tx);
            }
            self.version.fetch_add(1, std::sync::atomic::Ordering::Release);
        }
        let fleet = self.clone();
        let restart = Arc::new(tokio::sync::Notify::new());
        tokio::spawn(check_watch(bucket.clone(), self.clone(), restart.clone()));
        tokio::spawn(async move {
            use futures::StreamExt;
            loop {
                let mut watch = match bucket.watch_with_history(">").await {
                    Ok(w) => w,
                    Err(e) => {
                        tracing::warn!(err = %e, "cannot watch the shared fleet record; trying again");
                        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
                        continue;
                    }
                };
                loop {
                    let entry = tokio::select! {
                        entry = watch.next() => entry,
                        () = restart.notified() => break,
                    };
                    let Some(Ok(entry)) = entry else { break };
                    fleet.watch_seen.fetch_max(entry.revision, std::sync::atomic::Ordering::Relaxed);
                    let (repo, host) = match entry_of(&entry.key) {
                        Entry::Host(repo, host) => (repo, host),
                        Entry::Presence(name) => {
                            fleet.apply_presence(name, &entry);
                            continue;
                        }
                        Entry::Other => continue,
                    };
                    let record = match entry.operation {
                        async_nats::jetstream::kv::Operation::Put => {
                            match serde_json::from_slice::<SavedHost>(&entry.value) {
                                Ok(saved) => Some(saved.record),
                                Err(e) => {
                                    tracing::warn!(key = %entry.key, err = %e, "a shared fleet record entry is not one; ignored");
                                    continue;
                                }
                            }
                        }
                        _ => None,
                    };
                    fleet.apply(repo, host, record);
                }
            }
        });
    }

    /// A builder's presence as the shared record's watch delivered it.
    fn apply_presence(&self, name: &str, entry: &async_nats::jetstream::kv::Entry) {
        let presence = match entry.operation {
            async_nats::jetstream::kv::Operation::Put => match serde_json::from_slice::<Presence>(&entry.value) {
                Ok(p) => Some(p),
                Err(e) => {
                    tracing::warn!(key = %entry.key, err = %e, "a builder's presence in the shared record is not one; ignored");
                    return;
                }
            },
            _ => None,
        };
        let mut builders = self.builders.write().unwrap_or_else(|e| e.into_inner());
        let known = fleet_keys([], builders.values());
        if let Some(new) = presence.as_ref().and_then(|p| p.public_keys.iter().find(|k| !known.contains(k))) {
            tracing::info!(builder = %name, key = %new, "a builder of the fleet signs with a new key: clients trust it too (trusted-public-keys)");
        }
        match presence {
            Some(p) => builders.insert(name.to_owned(), p),
            None => builders.remove(name),
        };
        self.version.fetch_add(1, std::sync::atomic::Ordering::Release);
    }
}

/// What an entry of the shared record is, by its key.
enum Entry<'a> {
    Host(&'a str, &'a str),
    Presence(&'a str),
    /// Another of the builders' own keys (claims of builds in progress).
    Other,
}

fn entry_of(key: &str) -> Entry<'_> {
    if let Some(name) = key.strip_prefix(PRESENCE_PREFIX) {
        return Entry::Presence(name);
    }
    match key.split_once('/') {
        Some((repo, host)) if !key.starts_with('_') => Entry::Host(repo, host),
        _ => Entry::Other,
    }
}

/// The bucket key of a host: `<repo>/<host>` (neither name holds a `/`).
fn bucket_key(repo: &str, host: &str) -> String {
    format!("{repo}/{host}")
}

/// The key-value bucket `name` that holds the shared record, made if missing (file storage,
/// one value per key, `replicas` copies).
pub async fn open_shared(
    client: &async_nats::Client,
    name: &str,
    replicas: usize,
) -> Result<async_nats::jetstream::kv::Store, String> {
    let js = async_nats::jetstream::new(client.clone());
    // The bucket's stream as a key-value bucket has it, made directly: the client's own
    // `create_key_value` asks for account details older servers (2.9) answer otherwise.
    js.create_or_update_stream(async_nats::jetstream::stream::Config {
        name: format!("KV_{name}"),
        description: Some("hearth fleet record: one key per <repo>/<host>".into()),
        subjects: vec![format!("$KV.{name}.>")],
        max_messages_per_subject: 1,
        storage: async_nats::jetstream::stream::StorageType::File,
        num_replicas: replicas,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        discard: async_nats::jetstream::stream::DiscardPolicy::New,
        ..Default::default()
    })
    .await
    .map_err(|e| e.to_string())?;
    js.get_key_value(name).await.map_err(|e| e.to_string())
}

/// A write of the shared record that failed, by whether another write came between.
enum WriteError {
    /// A lost compare-and-set: the key is no longer at the revision read.
    LostRace,
    Other(String),
}

impl From<async_nats::jetstream::kv::UpdateError> for WriteError {
    fn from(e: async_nats::jetstream::kv::UpdateError) -> Self {
        match e.kind() {
            async_nats::jetstream::kv::UpdateErrorKind::WrongLastRevision => WriteError::LostRace,
            _ => WriteError::Other(e.to_string()),
        }
    }
}

impl From<async_nats::jetstream::kv::CreateError> for WriteError {
    fn from(e: async_nats::jetstream::kv::CreateError) -> Self {
        match e.kind() {
            async_nats::jetstream::kv::CreateErrorKind::AlreadyExists => WriteError::LostRace,
            _ => WriteError::Other(e.to_string()),
        }
    }
}

/// Applies `change` to the bucket's newest value of the host's key and writes it back only if
/// the key is still at the revision read (compare-and-set); a lost race reads and applies again
/// at once, an unreachable NATS is retried with backoff. Returns what was written (`None` in
/// the outer option: gave up).
async fn write_shared(
    bucket: &async_nats::jetstream::kv::Store,
    repo: &str,
    host: &str,
    change: &Change,
) -> Option<Option<HostRecord>> {
    let key = bucket_key(repo, host);
    let mut failures = 0u64;
    while failures < 30 {
        let current = match bucket.entry(key.clone()).await {
            Ok(entry) => entry,
            Err(e) => {
                tracing::warn!(%key, err = %e, "cannot read the shared fleet record yet");
                failures += 1;
                tokio::time::sleep(std::time::Duration::from_secs(1 + failures.min(9))).await;
                continue;
            }
        };
        let live = current.as_ref().filter(|e| e.operation == async_nats::jetstream::kv::Operation::Put);
        let revision = current.as_ref().map(|e| e.revision);
        let result = match change {
            Change::Update(f) => {
                let mut record = live
                    .and_then(|e| serde_json::from_slice::<SavedHost>(&e.value).ok())
                    .map(|s| s.record)
                    .unwrap_or_default();
                f(&mut record);
                let saved = SavedHost { repo: repo.to_owned(), host: host.to_owned(), record };
                let value = bytes::Bytes::from(serde_json::to_vec(&saved).unwrap_or_default());
                let written: Result<(), WriteError> = match revision {
                    Some(r) => bucket.update(&key, value, r).await.map(|_| ()).map_err(Into::into),
                    None => bucket.create(&key, value).await.map(|_| ()).map_err(Into::into),
                };
                written.map(|()| Some(saved.record))
            }
            Change::Delete if live.is_none() => return Some(None),
            Change::Delete => bucket.delete_expect_revision(&key, revision).await.map(|()| None).map_err(Into::into),
        };
        match result {
            Ok(written) => return Some(written),
            Err(WriteError::LostRace) => {
                tracing::debug!(%key, "another builder wrote this host meanwhile; applying the change again")
            }
            Err(WriteError::Other(e)) => {
                tracing::warn!(%key, err = %e, "cannot write the shared fleet record yet");
                failures += 1;
                tokio::time::sleep(std::time::Duration::from_secs(1 + failures.min(9))).await;
            }
        }
    }
    tracing::error!(%key, "gave up writing the shared fleet record; the next change of the host writes it");
    None
}

/// How often the shared record's watch is checked against the bucket.
const WATCH_CHECK: std::time::Duration = std::time::Duration::from_secs(10);

/// Restarts the watch of the shared record (`restart`) when it stalls: when the bucket's stream
/// has gone past what the watch delivered, and the watch delivered nothing more by the next
/// check. A watch stalls for good when its flow-control answers are refused (a builder without
/// `$JS.FC.>`): without this, its builder would show, and write from, a stale record for ever.
async fn check_watch(bucket: async_nats::jetstream::kv::Store, fleet: Arc<Fleet>, restart: Arc<tokio::sync::Notify>) {
    let mut behind_at: Option<u64> = None;
    loop {
        tokio::time::sleep(WATCH_CHECK).await;
        // Asked of the server each time (the store's own `status` is what it was when opened).
        let mut stream = bucket.stream.clone();
        let last = match stream.info().await {
            Ok(info) => info.state.last_sequence,
            Err(e) => {
                tracing::debug!(err = %e, "cannot read the shared fleet record's state");
                continue;
            }
        };
        let seen = fleet.watch_seen.load(std::sync::atomic::Ordering::Relaxed);
        behind_at = match behind_at {
            // Behind at the last check too, and nothing delivered since.
            Some(was) if seen < last && seen == was => {
                tracing::warn!(
                    seen,
                    last,
                    "the shared fleet record's watch stalled (does the builder's NATS user lack `$JS.FC.>`?); starting it again"
                );
                fleet.watch_restarts.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                restart.notify_one();
                None
            }
            _ if seen < last => Some(seen),
            _ => None,
        };
    }
}

/// The builders a key-value bucket's record names, by name (for `check-config`).
pub async fn read_presences(bucket: &async_nats::jetstream::kv::Store) -> BTreeMap<String, Presence> {
    read_bucket_entries(bucket).await.1
}

/// The whole record a key-value bucket holds (entries that are not host records are skipped).
pub async fn read_bucket(bucket: &async_nats::jetstream::kv::Store) -> Result<Hosts, String> {
    let (hosts, _, problems) = read_bucket_entries(bucket).await;
    match problems.first() {
        None => Ok(hosts),
        Some(first) => Err(format!("{} of the shared fleet record's entries cannot be read: {first}", problems.len())),
    }
}

/// Every entry of the shared record that can be read (hosts, and builders' presences), and
/// what went wrong with the others (a listing cut short, an entry unreadable or not a record).
async fn read_bucket_entries(
    bucket: &async_nats::jetstream::kv::Store,
) -> (Hosts, BTreeMap<String, Presence>, Vec<String>) {
    use futures::StreamExt;
    let mut loaded = Hosts::new();
    let mut presences = BTreeMap::new();
    let mut problems = Vec::new();
    let mut keys = match bucket.keys().await {
        Ok(keys) => keys,
        Err(e) => return (loaded, presences, vec![format!("cannot list the keys: {e}")]),
    };
    while let Some(key) = keys.next().await {
        let key = match key {
            Ok(key) => key,
            Err(e) => {
                problems.push(format!("the key listing failed: {e}"));
                break;
            }
        };
        let presence = match entry_of(&key) {
            Entry::Other => continue,
            Entry::Presence(_) => true,
            Entry::Host(..) => false,
        };
        match bucket.get(&key).await {
            // Deleted between the listing and the read.
            Ok(None) => {}
            Ok(Some(value)) if presence => match serde_json::from_slice::<Presence>(&value) {
                Ok(p) => {
                    presences.insert(p.name.clone(), p);
                }
                Err(e) => {
                    tracing::warn!(%key, err = %e, "a builder's presence in the shared record is not one; ignored")
                }
            },
            Ok(Some(value)) => match serde_json::from_slice::<SavedHost>(&value) {
                Ok(saved) => {
                    loaded.insert((saved.repo, saved.host), saved.record);
                }
                Err(e) => problems.push(format!("{key} is not a host record: {e}")),
            },
            Err(e) => problems.push(format!("cannot read {key}: {e}")),
        }
    }
    (loaded, presences, problems)
}
