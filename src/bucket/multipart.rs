//! Uploads in parts, journaled: before its first part a multipart upload's key and id are
//! written to a small file under the journal directory (`<state_dir>/multipart`), and removed
//! once it is completed or aborted. An upload cut by a crash (or an abort that failed) leaves its
//! file, so its parts, which S3 keeps and bills but no listing shows, are aborted later: by the
//! uploader at startup and by `hearth bucket gc` (uploads older than its grace).

use std::path::{Path as FsPath, PathBuf};
use std::time::Duration;

use object_store::multipart::{MultipartStore, PartId};
use object_store::path::Path;

use super::{Bucket, BucketError, PART};

/// One journaled upload.
#[derive(serde::Serialize, serde::Deserialize)]
struct Entry {
    key: String,
    id: String,
}

/// The journal file of an upload of `key`.
fn entry_file(dir: &FsPath, key: &str, id: &str) -> PathBuf {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(format!("{key}\0{id}").as_bytes());
    dir.join(hex::encode(&digest[..16]))
}

impl Bucket {
    /// Uploads `f` (of `size` bytes, read from its start) as `key` in parts, checking with
    /// `check` (given the whole file's sha256) before the object is complete; any failure
    /// aborts the upload, and one whose abort fails stays journaled.
    pub(super) async fn put_parts(
        &self,
        key: &str,
        f: &mut tokio::fs::File,
        check: impl FnOnce(sha2::Sha256) -> Result<(), BucketError>,
    ) -> Result<(), BucketError> {
        use sha2::Digest;
        use tokio::io::AsyncReadExt;
        let path = Path::from(key);
        let id = self.s3.create_multipart(&path).await?;
        let journaled = self.journal(key, &id);
        let sent = async {
            let mut hasher = sha2::Sha256::new();
            let mut parts = Vec::new();
            // One part read while the one before is sent.
            let mut sending: Option<tokio::task::JoinHandle<Result<PartId, object_store::Error>>> = None;
            loop {
                let mut buf = Vec::with_capacity(PART);
                let n = (&mut *f).take(PART as u64).read_to_end(&mut buf).await?;
                if let Some(previous) = sending.take() {
                    parts.push(previous.await.map_err(std::io::Error::other)??);
                }
                if n == 0 {
                    break;
                }
                hasher.update(&buf);
                let (s3, path, id, idx) = (self.s3.clone(), path.clone(), id.clone(), parts.len());
                sending = Some(tokio::spawn(async move { s3.put_part(&path, &id, idx, buf.into()).await }));
            }
            check(hasher)?;
            Ok::<_, BucketError>(parts)
        }
        .await;
        let ended = match sent {
            Ok(parts) => self.s3.complete_multipart(&path, &id, parts).await.map(|_| ()).map_err(BucketError::from),
            Err(e) => match self.s3.abort_multipart(&path, &id).await {
                Ok(()) => Err(e),
                Err(abort) => {
                    tracing::warn!(%key, err = %abort, "cannot abort a multipart upload; the next start or gc aborts it");
                    return Err(e);
                }
            },
        };
        if let Some(file) = journaled {
            let _ = std::fs::remove_file(file);
        }
        ended
    }

    /// Writes the journal file of an upload (none without a journal directory).
    fn journal(&self, key: &str, id: &str) -> Option<PathBuf> {
        let dir = self.journal.as_ref()?;
        let file = entry_file(dir, key, id);
        let entry = serde_json::to_vec(&Entry { key: key.to_owned(), id: id.to_owned() }).ok()?;
        match std::fs::create_dir_all(dir).and_then(|()| std::fs::write(&file, entry)) {
            Ok(()) => Some(file),
            Err(e) => {
                tracing::warn!(dir = %dir.display(), err = %e, "cannot journal a multipart upload; a crash would leave its parts");
                None
            }
        }
    }

    /// Aborts every journaled upload whose journal file is older than `age` (none is in
    /// flight then); returns how many were aborted. An upload S3 no longer knows counts as
    /// aborted.
    pub async fn abort_stale_uploads(&self, age: Duration) -> usize {
        let Some(dir) = &self.journal else { return 0 };
        let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
        let mut aborted = 0;
        for file in entries.filter_map(Result::ok).map(|e| e.path()) {
            let old =
                std::fs::metadata(&file).and_then(|m| m.modified()).is_ok_and(|t| t.elapsed().is_ok_and(|e| e >= age));
            let entry = crate::regular_file::read_to_string(&file, 4096)
                .ok()
                .and_then(|text| serde_json::from_str::<Entry>(&text).ok());
            let (true, Some(entry)) = (old, entry) else { continue };
            match self.s3.abort_multipart(&Path::from(entry.key.as_str()), &entry.id).await {
                Ok(()) => {
                    tracing::debug!(key = %entry.key, "aborted a multipart upload left behind");
                    let _ = std::fs::remove_file(&file);
                    aborted += 1;
                }
                Err(object_store::Error::NotFound { .. }) => {
                    tracing::debug!(key = %entry.key, "a multipart upload left behind is gone already");
                    let _ = std::fs::remove_file(&file);
                    aborted += 1;
                }
                Err(e) => tracing::warn!(key = %entry.key, err = %e, "cannot abort a multipart upload left behind yet"),
            }
        }
        aborted
    }
}
