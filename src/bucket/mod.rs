//! The S3 bucket the builder pushes what it built to, in Nix's own binary-cache layout
//! (`nix-cache-info`, `<hash>.narinfo`, `nar/<FileHash>.nar.zst`), so that any Nix client can
//! substitute from it directly (Garage's website endpoint, a CDN) and the cache outlives the build
//! host.
//!
//! The S3 client is `object_store` (Apache Arrow's, well kept, async, with SigV4 and multipart
//! uploads; lighter than the AWS SDK): no signing is written here. Architecture invariant: a
//! narinfo is only ever written after the NAR it points to is complete in the bucket.

pub mod cli;
mod closure;
pub mod config;
pub mod gc;
mod multipart;
pub mod read_cache;
pub mod upload;

use std::sync::Arc;

use object_store::{ObjectStore, ObjectStoreExt, PutPayload, path::Path};

pub use config::{BucketConfig, BucketSection};

#[derive(Debug, thiserror::Error)]
pub enum BucketError {
    #[error("S3: {0}")]
    S3(#[from] object_store::Error),
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Store(String),
    #[error("{key} is larger than the {max} bytes an object read whole may be")]
    TooLarge { key: String, max: usize },
    /// The file to upload is not what its name says: its bytes do not hash to its FileHash.
    #[error("{file}: its bytes do not match its FileHash {file_hash}; not uploaded")]
    Damaged { file: String, file_hash: String },
}

/// The most bytes [`Bucket::get`] reads: a narinfo of some 15,000 references.
pub const MAX_READ: usize = 1 << 20;
/// The most bytes a narinfo read through the bucket may have (a real one of 5,000 references
/// is about 330 KiB); a larger object under a narinfo's name is not one.
pub const MAX_NARINFO: usize = 512 << 10;

/// The object a running `hearth bucket gc` holds: `{"started_at": <unix seconds>}`. While it is
/// there (and younger than [`GC_LEASE_TTL`]) pushes adopt nothing: they wait for gc to end.
pub const GC_LEASE: &str = "gc-lease";
/// The object a finished `hearth bucket gc` writes: `{"finished_at": <unix seconds>}`, so that
/// `--once-per` collects once per period however many builders' timers run it.
pub const GC_DONE: &str = "gc-done";
/// How long a gc lease holds at most (a gc that died leaves one behind).
pub const GC_LEASE_TTL: i64 = 6 * 3600;

/// When the gc lease in `bucket` was taken, if there is one still in force at `now`.
pub async fn gc_lease(bucket: &Bucket, now: i64) -> Result<Option<i64>, BucketError> {
    let started = gc_stamp(bucket, GC_LEASE, "started_at").await?;
    Ok(started.filter(|at| now - at < GC_LEASE_TTL))
}

/// The time (unix seconds) gc's small object `key` holds in `field`, if it is there and readable.
pub async fn gc_stamp(bucket: &Bucket, key: &str, field: &str) -> Result<Option<i64>, BucketError> {
    let Some(bytes) = bucket.get(key).await? else { return Ok(None) };
    Ok(serde_json::from_slice::<serde_json::Value>(&bytes).ok().and_then(|v| v[field].as_i64()))
}

/// A bucket and its client.
#[derive(Clone)]
pub struct Bucket {
    store: Arc<dyn ObjectStore>,
    /// The same client, for uploads in parts.
    s3: Arc<object_store::aws::AmazonS3>,
    /// Where multipart uploads are journaled (`multipart.rs`), if anywhere.
    journal: Option<std::path::PathBuf>,
    pub name: String,
    /// Where clients fetch objects themselves, if they can (`[bucket] public_url`).
    pub public_url: Option<String>,
}

/// Parts of a multipart upload: S3's minimum is 5 MiB.
const PART: usize = 8 << 20;

impl Bucket {
    pub fn open(config: &BucketConfig) -> Result<Self, BucketError> {
        let store = object_store::aws::AmazonS3Builder::new()
            .with_bucket_name(&config.bucket)
            .with_endpoint(&config.endpoint)
            .with_region(&config.region)
            .with_access_key_id(&config.access_key_id)
            .with_secret_access_key(&config.secret_access_key)
            // Path style: `<endpoint>/<bucket>/<key>`, which every S3 server answers.
            .with_virtual_hosted_style_request(false)
            // A bucket that is away is said within seconds (a read-through 503 to retry); the
            // uploader retries on its own, with longer backoff.
            // No bound on a whole request (a NAR streamed to a slow host, or into a copy,
            // takes as long as it takes), but on the connect and on each read, so that a
            // bucket that stops answering mid-stream is noticed.
            .with_client_options(
                object_store::ClientOptions::new()
                    .with_timeout_disabled()
                    .with_connect_timeout(std::time::Duration::from_secs(5))
                    .with_read_timeout(std::time::Duration::from_secs(30))
                    .with_allow_http(config.endpoint.starts_with("http://")),
            )
            .with_retry(object_store::RetryConfig {
                max_retries: 2,
                retry_timeout: std::time::Duration::from_secs(5),
                ..Default::default()
            })
            .build()?;
        let s3 = Arc::new(store);
        Ok(Self {
            store: s3.clone(),
            s3,
            journal: None,
            name: config.bucket.clone(),
            public_url: config.public_url.clone(),
        })
    }

    /// The same bucket, its multipart uploads journaled under `dir`.
    pub fn with_journal(mut self, dir: std::path::PathBuf) -> Self {
        self.journal = Some(dir);
        self
    }

    /// Whether `key` is in the bucket.
    pub async fn exists(&self, key: &str) -> Result<bool, BucketError> {
        match self.store.head(&Path::from(key)).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// The object `key`, if there is one.
    ///
    /// Objects read whole are narinfos and record entries: one larger than [`MAX_READ`] is an
    /// error, never read into memory.
    pub async fn get(&self, key: &str) -> Result<Option<bytes::Bytes>, BucketError> {
        self.get_at_most(key, MAX_READ).await
    }

    /// The object `key`, if there is one of `max` bytes at most (a larger one is an error,
    /// never read into memory).
    pub async fn get_at_most(&self, key: &str, max: usize) -> Result<Option<bytes::Bytes>, BucketError> {
        use futures::StreamExt;
        let result = match self.store.get(&Path::from(key)).await {
            Ok(r) => r,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let too_large = || BucketError::TooLarge { key: key.to_owned(), max };
        if result.meta.size > max as u64 {
            return Err(too_large());
        }
        let mut body = bytes::BytesMut::new();
        let mut stream = result.into_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk?;
            if body.len() + chunk.len() > max {
                return Err(too_large());
            }
            body.extend_from_slice(&chunk);
        }
        Ok(Some(body.freeze()))
    }

    /// The size of the object `key`, if there is one.
    pub async fn size(&self, key: &str) -> Result<Option<u64>, BucketError> {
        match self.store.head(&Path::from(key)).await {
            Ok(meta) => Ok(Some(meta.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// The bytes `range` of the object `key`, as they arrive.
    pub async fn stream(
        &self,
        key: &str,
        range: std::ops::Range<u64>,
    ) -> Result<impl futures::Stream<Item = Result<bytes::Bytes, std::io::Error>> + Send + 'static, BucketError> {
        use futures::TryStreamExt;
        let options = object_store::GetOptions { range: Some(range.into()), ..Default::default() };
        let result = self.store.get_opts(&Path::from(key), options).await?;
        Ok(result.into_stream().map_err(std::io::Error::other))
    }

    pub async fn put(&self, key: &str, bytes: bytes::Bytes) -> Result<(), BucketError> {
        self.store.put(&Path::from(key), PutPayload::from(bytes)).await?;
        Ok(())
    }

    /// Uploads the file at `file` (a regular file, never through a link) as `key`, checking
    /// that its bytes hash to `file_hash` (`sha256:<nix32>`) before the object is complete: in
    /// one request when small, else in parts (so memory stays at a part or two whatever the
    /// NAR's size). A damaged file, or any error, leaves no object and no parts behind (a
    /// multipart upload that does not finish is aborted).
    pub async fn put_file(&self, key: &str, file: &std::path::Path, file_hash: &str) -> Result<u64, BucketError> {
        use sha2::Digest;
        use tokio::io::AsyncReadExt;
        let mut f = tokio::fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW).open(file).await?;
        let size = f.metadata().await?.len();
        let damaged = || BucketError::Damaged { file: file.display().to_string(), file_hash: file_hash.to_owned() };
        let matches =
            |hasher: sha2::Sha256| format!("sha256:{}", crate::nix::nixbase32::encode(&hasher.finalize())) == file_hash;
        if size <= PART as u64 {
            let mut bytes = Vec::with_capacity(size as usize);
            f.read_to_end(&mut bytes).await?;
            if !matches(sha2::Sha256::new_with_prefix(&bytes)) {
                return Err(damaged());
            }
            self.put(key, bytes.into()).await?;
            return Ok(size);
        }
        self.put_parts(key, &mut f, |hasher| if matches(hasher) { Ok(()) } else { Err(damaged()) }).await?;
        Ok(size)
    }

    /// Every object: key, size and when it was last written (unix seconds).
    pub async fn list(&self) -> Result<Vec<(String, u64, i64)>, BucketError> {
        use futures::TryStreamExt;
        let all: Vec<object_store::ObjectMeta> = self.store.list(None).try_collect().await?;
        Ok(all.into_iter().map(|m| (m.location.to_string(), m.size, m.last_modified.timestamp())).collect())
    }

    pub async fn delete(&self, key: &str) -> Result<(), BucketError> {
        self.store.delete(&Path::from(key)).await?;
        Ok(())
    }
}

/// Where a hearth journals its multipart uploads (under its state directory).
pub fn journal_dir(state_dir: &std::path::Path) -> std::path::PathBuf {
    state_dir.join("multipart")
}

/// The narinfo key of a store path hash.
pub fn narinfo_key(hash: &str) -> String {
    format!("{hash}.narinfo")
}

/// The key of a compressed NAR, named by its file hash (`sha256:<nix32>`) as Nix names it.
pub fn nar_key(file_hash: &str) -> String {
    format!("nar/{}.nar.zst", file_hash.strip_prefix("sha256:").unwrap_or(file_hash))
}
