//! `GET|HEAD /<hash>.narinfo` and `/<hash>.ls`: parse, ask the store, sign, render.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};

use super::AppState;
use super::error::{HttpError, HttpResult};
use crate::nix::http_path;
use crate::nix::narinfo::NarInfo;
use crate::nix::store_path::StorePathHash;
use crate::store::PathInfo;

/// `/{file}` at the root: `.narinfo` or `.ls`; anything else is not a route of ours.
pub(super) async fn get_root_file(State(state): State<AppState>, Path(file): Path<String>) -> HttpResult<Response> {
    if file.ends_with(".narinfo") {
        let hash = http_path::parse_narinfo(&file).ok_or(HttpError::BadRequest("malformed narinfo hash"))?;
        let headers = [(header::CONTENT_TYPE, "text/x-nix-narinfo"), (header::CACHE_CONTROL, "public, max-age=86400")];
        let Some(info) = state.store.path_info(hash).await? else {
            // Not here: the bucket's narinfo, as the bucket has it (signed by its builder).
            let Some(bucket) = &state.bucket else { return Err(HttpError::NotFound) };
            // Kept a while: a fleet asks for each narinfo once per host, and a bucket that is
            // briefly away does not stop what was just asked for.
            if let Some((at, text)) = state.bucket_narinfos.get(&hash)
                && at.elapsed() < BUCKET_NARINFO_TTL
            {
                return Ok((headers, text).into_response());
            }
            let key = crate::bucket::narinfo_key(hash.as_str());
            let text = match bucket.get_at_most(&key, crate::bucket::MAX_NARINFO).await {
                Ok(text) => text.ok_or(HttpError::NotFound)?,
                Err(e @ crate::bucket::BucketError::TooLarge { .. }) => {
                    tracing::warn!(err = %e, "the bucket's narinfo is not one this cache serves; answering 404");
                    return Err(HttpError::NotFound);
                }
                Err(e) => return Err(HttpError::Bucket(e.to_string())),
            };
            let Some(text) = from_bucket(state.store.store_dir(), hash, &text) else {
                tracing::warn!(
                    key,
                    "the bucket's narinfo is not one this cache serves (malformed, another path's, or a NAR URL of another place); answering 404"
                );
                return Err(HttpError::NotFound);
            };
            state.bucket_narinfos.insert(hash, (std::time::Instant::now(), text.clone()));
            return Ok((headers, text).into_response());
        };
        // HEAD gets the same headers as GET, Content-Length included (RFC 9110); the server
        // sends no body for it.
        // A hot compressed NAR's narinfo carries the exact FileHash and FileSize of its file.
        let file = state
            .store
            .nar_cache()
            .filter(|c| c.compressed() && state.cache.zstd_level.is_some())
            .and_then(|c| c.peek(hash, &info.nar_hash))
            .map(|e| (e.file_hash, e.file_size));
        let text = state.narinfos.get_or_render(&info, file.as_ref().map(|f| f.0.as_str()), || {
            let mut narinfo = render(&state, &info);
            if let Some((file_hash, file_size)) = &file {
                narinfo.file_hash = Some(file_hash.clone());
                narinfo.file_size = Some(*file_size);
            }
            narinfo.to_string()
        });
        Ok((headers, text).into_response())
    } else if file.ends_with(".ls") {
        let hash = http_path::parse_listing(&file).ok_or(HttpError::BadRequest("malformed listing hash"))?;
        let info = state.store.path_info(hash).await?.ok_or(HttpError::NotFound)?;
        let (root, nar_size) = state.store.listing(&info.path).await?;
        if nar_size != info.nar_size {
            return Err(HttpError::Store(crate::store::StoreError::Corrupt(format!("{} changed on disk", info.path))));
        }
        let headers = [(header::CONTENT_TYPE, "application/json"), (header::CACHE_CONTROL, "public, max-age=86400")];
        Ok((headers, crate::nix::listing::render(&root)).into_response())
    } else {
        Err(HttpError::NotFound)
    }
}

/// How long a narinfo read through the bucket is answered without asking it again (a path the
/// bucket's gc deleted is still offered this long; only paths no kept generation needs).
const BUCKET_NARINFO_TTL: std::time::Duration = std::time::Duration::from_secs(600);

/// Rendered, signed narinfos, reused while the store returns the same path info (the same `Arc`).
/// Signing is most of a narinfo's cost.
pub(crate) struct NarinfoCache {
    /// Keyed by path; valid for the same path info and the same hot-NAR file (if any).
    entries: quick_cache::sync::Cache<StorePathHash, Rendered, TextBytes>,
}

type Rendered = (Arc<PathInfo>, Option<String>, Bytes);

/// Weighs a cached narinfo by its bytes (and a little for what it keeps besides), so that a
/// cache's bound is one of memory, whatever the narinfos' sizes.
#[derive(Clone)]
pub(crate) struct TextBytes;

impl quick_cache::Weighter<StorePathHash, Rendered> for TextBytes {
    fn weight(&self, _: &StorePathHash, (_, _, text): &Rendered) -> u64 {
        text.len() as u64 + 512
    }
}

impl quick_cache::Weighter<StorePathHash, (std::time::Instant, String)> for TextBytes {
    fn weight(&self, _: &StorePathHash, (_, text): &(std::time::Instant, String)) -> u64 {
        text.len() as u64 + 128
    }
}

/// Bytes the rendered narinfos keep at most.
pub(crate) const NARINFO_CACHE_BYTES: u64 = 64 << 20;
/// Bytes the narinfos read through the bucket keep at most.
pub(crate) const BUCKET_NARINFO_CACHE_BYTES: u64 = 32 << 20;

impl NarinfoCache {
    pub(crate) fn new(bytes: u64) -> Self {
        Self { entries: quick_cache::sync::Cache::with_weighter(100_000, bytes, TextBytes) }
    }

    fn get_or_render(&self, info: &Arc<PathInfo>, file_hash: Option<&str>, render: impl FnOnce() -> String) -> Bytes {
        let hash = info.path.hash();
        if let Some((cached, cached_file, text)) = self.entries.get(&hash)
            && Arc::ptr_eq(&cached, info)
            && cached_file.as_deref() == file_hash
        {
            return text;
        }
        let text = Bytes::from(render());
        self.entries.insert(hash, (info.clone(), file_hash.map(str::to_owned), text.clone()));
        text
    }
}

/// A bucket's narinfo as this cache serves it, if it may: for the path asked for, its NAR at a
/// relative `nar/<file hash>.nar.zst` this cache serves itself (an absolute URL is not covered
/// by the signature and could send a client anywhere), written out again with only the fields
/// this cache knows. The signatures stay valid: they cover the path, NarHash, NarSize and
/// references, never the URL or the layout.
fn from_bucket(store_dir: &str, hash: StorePathHash, text: &[u8]) -> Option<String> {
    let narinfo = NarInfo::parse(std::str::from_utf8(text).ok()?)?;
    let path = crate::nix::store_path::StorePath::from_absolute(store_dir, &narinfo.store_path)?;
    let nar = http_path::parse_nar(narinfo.url.strip_prefix("nar/")?, None)?;
    let servable = path.hash() == hash
        && nar.store_hash.is_none()
        && nar.encoding == http_path::NarEncoding::Zstd
        && narinfo.compression == "zstd";
    servable.then(|| narinfo.to_string())
}

/// The narinfo for `info` as this cache serves it.
pub(crate) fn render(state: &AppState, info: &PathInfo) -> NarInfo {
    let store_dir = state.store.store_dir();
    let nar_nix32 = info.nar_hash.strip_prefix("sha256:").unwrap_or(&info.nar_hash);
    let hash = info.path.hash();
    let (url, compression, file) = match state.cache.zstd_level {
        Some(_) => (format!("nar/{nar_nix32}.nar.zst?hash={hash}"), "zstd", None),
        None => (format!("nar/{nar_nix32}.nar?hash={hash}"), "none", Some((info.nar_hash.clone(), info.nar_size))),
    };
    let mut narinfo = info.narinfo(store_dir, url, compression, file);
    let fingerprint = narinfo.fingerprint(store_dir);
    // Our keys' signatures replace any the store holds under the same key names.
    let ours: Vec<String> = state.keys.iter().map(|k| k.sign(&fingerprint)).collect();
    let our_names: Vec<&str> = state.keys.iter().map(|k| k.name()).collect();
    for sig in &info.sigs {
        let name = sig.split(':').next().unwrap_or("");
        if !our_names.contains(&name) && !narinfo.sigs.contains(sig) {
            narinfo.sigs.push(sig.clone());
        }
    }
    narinfo.sigs.extend(ours);
    narinfo
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_narinfo_caches_are_bounded_in_bytes() {
        let cache: quick_cache::sync::Cache<StorePathHash, (std::time::Instant, String), TextBytes> =
            quick_cache::sync::Cache::with_weighter(1000, 4 << 20, TextBytes);
        for i in 0..64u32 {
            let hash = StorePathHash::parse(format!("{i:0>32}").as_bytes()).unwrap();
            cache.insert(hash, (std::time::Instant::now(), "x".repeat(256 << 10)));
        }
        // 64 narinfos of 256 KiB: 16 MiB offered, 4 MiB kept at most.
        assert!(cache.weight() <= 4 << 20, "{} bytes kept", cache.weight());
        assert!(cache.len() <= 16, "{} kept", cache.len());
    }
}
