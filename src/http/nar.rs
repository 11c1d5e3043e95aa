//! `GET|HEAD /nar/<file>`: a NAR streamed from the store, whole, as a range, or zstd-compressed.
//!
//! The body never holds more than a few chunks; HEAD answers from the path info alone. A NAR is
//! never sent with a `Content-Encoding`: `.nar.zst` is a different file, as its narinfo says.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::body::{Body, Bytes};
use axum::extract::{Extension, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use http_body::{Frame, SizeHint};

use super::AppState;
use super::error::{HttpError, HttpResult};
use super::range::{RangeDecision, decide};
use super::slots::{Conn, SlotBody};
use crate::metrics::Metrics;
use crate::nix::http_path::{self, NarEncoding};
use crate::store::PathInfo;
use crate::store::nar_stream::{Encoding, NarStream};
use futures::Stream;

/// `nar/<file>` from the read-through bucket, streamed (Range included) under the same stream
/// bounds as a NAR from the store.
async fn from_bucket(
    bucket: &crate::bucket::Bucket,
    state: &AppState,
    conn: Option<&Conn>,
    method: &Method,
    headers: &HeaderMap,
    file: &str,
) -> HttpResult<Response> {
    let key = format!("nar/{file}");
    // Clients can fetch it themselves: a redirect (temporary, so that a moved bucket is
    // followed), the bucket not asked at all. `file` was checked to be a nix32 name.
    if let Some(public) = &bucket.public_url {
        let location = HeaderValue::from_str(&format!("{public}/{key}")).map_err(|_| HttpError::NotFound)?;
        return Ok((StatusCode::FOUND, [(header::LOCATION, location)]).into_response());
    }
    let finished = state.bucket_copies.as_ref().and_then(|c| c.finished_size(file));
    let size = match finished {
        Some(size) => size,
        None => bucket.size(&key).await.map_err(|e| HttpError::Bucket(e.to_string()))?.ok_or(HttpError::NotFound)?,
    };
    let mut resp_headers = HeaderMap::new();
    resp_headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/x-nix-nar"));
    resp_headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("public, max-age=31536000, immutable"));
    resp_headers.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    // The key names the file's hash: it is its own entity tag.
    let etag = format!("\"{}\"", file.trim_end_matches(".nar.zst"));
    if let Ok(v) = HeaderValue::from_str(&etag) {
        resp_headers.insert(header::ETAG, v);
    }
    let (status, start, end) = ranged(headers, &etag, size, &mut resp_headers)?;
    resp_headers.insert(header::CONTENT_LENGTH, HeaderValue::from(end - start));
    if *method == Method::HEAD || start == end {
        return Ok((status, resp_headers, Body::empty()).into_response());
    }
    let slots = state.streams.acquire(conn, headers, &[&state.streams.nar], "too many NAR downloads").await?;
    // From the local copy (made now if this is its first whole GET), else from the bucket.
    let copy = match &state.bucket_copies {
        Some(copies) => copies.read(bucket, file, size, start, end).await,
        None => None,
    };
    let body = match copy {
        Some(stream) => Body::from_stream(stream),
        None => {
            let stream = bucket.stream(&key, start..end).await.map_err(|e| HttpError::Bucket(e.to_string()))?;
            Body::from_stream(stream)
        }
    };
    let body = SlotBody::new(body, slots);
    Ok((status, resp_headers, Body::new(body)).into_response())
}

#[derive(serde::Deserialize)]
pub(super) struct NarQuery {
    hash: Option<String>,
}

pub(super) async fn get(
    State(state): State<AppState>,
    conn: Option<Extension<Conn>>,
    method: Method,
    Path(file): Path<String>,
    Query(query): Query<NarQuery>,
    headers: HeaderMap,
) -> HttpResult<Response> {
    let req = http_path::parse_nar(&file, query.hash.as_deref()).ok_or(HttpError::BadRequest("malformed NAR URL"))?;
    // Without the store path's hash we cannot find the path without a scan: not in this cache,
    // but a bucket's NAR (named by its file hash, as its narinfos name it) when reading through.
    let Some(store_hash) = req.store_hash else {
        return match (&state.bucket, req.encoding) {
            (Some(bucket), NarEncoding::Zstd) => {
                from_bucket(bucket, &state, conn.as_deref(), &method, &headers, &file).await
            }
            _ => Err(HttpError::NotFound),
        };
    };
    let info = state.store.path_info(store_hash).await?.ok_or(HttpError::NotFound)?;
    if crate::nix::sha256_bytes(&info.nar_hash) != Some(req.nar_hash.0) {
        // The path exists but with other contents than the client asked for.
        return Err(HttpError::NotFound);
    }
    let level = match (req.encoding, state.cache.zstd_level) {
        (NarEncoding::None, _) => None,
        (NarEncoding::Zstd, Some(level)) => Some(level),
        (NarEncoding::Zstd, None) => return Err(HttpError::NotFound),
    };
    if let Some(resp) = hot(&state, conn.as_deref(), &method, &headers, &info, level).await? {
        return Ok(resp);
    }
    let (status, encoding, length, resp_headers) = plan_response(&headers, &info, level)?;
    if method == Method::HEAD {
        // With no length known (zstd made on the fly), send none, as GET does: an empty body of
        // unknown size, never `Content-Length: 0`.
        let body = match length {
            Some(_) => Body::empty(),
            None => Body::from_stream(futures::stream::empty::<Result<Bytes, std::io::Error>>()),
        };
        return Ok((status, resp_headers, body).into_response());
    }
    let slots = stream_slots(&state, conn.as_deref(), &headers, &encoding).await?;
    let root = state.store.hold(&info.path).await?.ok_or(HttpError::NotFound)?;
    let stream = state.store.nar_stream(&info.path, encoding, root);
    let body = SlotBody::new(NarBody::new(stream, length, state.metrics.clone(), false), slots);
    Ok((status, resp_headers, Body::new(body)).into_response())
}

/// A hot NAR of this very NarHash, in the asked encoding (`level`), served from its file;
/// `None` if there is none (or it was gone or damaged, and is dropped): serve from the store.
/// A second whole GET of a path asks for its hot NAR.
async fn hot(
    state: &AppState,
    conn: Option<&Conn>,
    method: &Method,
    headers: &HeaderMap,
    info: &Arc<PathInfo>,
    level: Option<i32>,
) -> HttpResult<Option<Response>> {
    let Some(cache) = state.store.nar_cache().filter(|c| c.compressed() == level.is_some()) else { return Ok(None) };
    let store_hash = info.path.hash();
    if let Some(entry) = cache.get(store_hash, &info.nar_hash)
        && let Some(resp) = serve_cached(state, conn, method, headers, store_hash, &entry).await?
    {
        return Ok(Some(resp));
    }
    state.metrics.nar_cache_misses.inc();
    // Only a whole GET asks for the NAR: HEAD and Range requests never fill the cache.
    let whole_get = method == Method::GET && !headers.contains_key(header::RANGE);
    if whole_get && cache.second_request(store_hash) {
        state.store.cache_nars(std::slice::from_ref(info));
    }
    Ok(None)
}

/// The response's status, encoding, length (none for zstd made on the fly) and headers: a
/// plain NAR has ranges and its NarHash as its ETag.
fn plan_response(
    headers: &HeaderMap,
    info: &PathInfo,
    level: Option<i32>,
) -> HttpResult<(StatusCode, Encoding, Option<u64>, HeaderMap)> {
    let size = info.nar_size;
    let mut resp_headers = HeaderMap::new();
    resp_headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/x-nix-nar"));
    resp_headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("public, max-age=31536000, immutable"));
    let (status, encoding, length) = match level {
        Some(level) => (StatusCode::OK, Encoding::Zstd { level, nar_size: size }, None),
        None => {
            resp_headers.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
            // A NAR never changes: its hash is its strong validator. `If-Range` with any other
            // validator (or a date: there is no Last-Modified) asks for the whole NAR.
            let etag = format!("\"{}\"", info.nar_hash.strip_prefix("sha256:").unwrap_or(&info.nar_hash));
            if let Ok(v) = HeaderValue::from_str(&etag) {
                resp_headers.insert(header::ETAG, v);
            }
            let (status, start, end) = ranged(headers, &etag, size, &mut resp_headers)?;
            (status, Encoding::Plain { start, end }, Some(end - start))
        }
    };
    if let Some(len) = length {
        resp_headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    }
    Ok((status, encoding, length, resp_headers))
}

/// Bounds: streams at once, and compressed streams (each holds an encoder) at once. At a
/// bound the stream idle longest gives its slot up; failing that the request waits a bounded
/// while for a freed slot, and only then is told to come back shortly.
async fn stream_slots(
    state: &AppState,
    conn: Option<&Conn>,
    headers: &HeaderMap,
    encoding: &Encoding,
) -> HttpResult<Vec<super::slots::Slot>> {
    let streams = &state.streams;
    match encoding {
        Encoding::Zstd { .. } => {
            streams.acquire(conn, headers, &[&streams.nar, &streams.zstd], "too many compressed downloads").await
        }
        Encoding::Plain { .. } => streams.acquire(conn, headers, &[&streams.nar], "too many NAR downloads").await,
    }
}

/// Decides a request's range over `size` bytes whose strong validator is `etag`: `If-Range`
/// with any other validator (or a date: there is no Last-Modified) asks for everything.
/// Returns the status and `[start, end)`, and sets `Content-Range` for a partial reply.
fn ranged(headers: &HeaderMap, etag: &str, size: u64, resp: &mut HeaderMap) -> HttpResult<(StatusCode, u64, u64)> {
    let if_range_ok = headers.get(header::IF_RANGE).is_none_or(|v| v.as_bytes() == etag.as_bytes());
    let range = headers.get(header::RANGE).filter(|_| if_range_ok).map(|v| v.as_bytes());
    match decide(range, size) {
        RangeDecision::Full => Ok((StatusCode::OK, 0, size)),
        RangeDecision::Partial { start, end } => {
            if let Ok(v) = HeaderValue::from_str(&format!("bytes {start}-{}/{size}", end - 1)) {
                resp.insert(header::CONTENT_RANGE, v);
            }
            Ok((StatusCode::PARTIAL_CONTENT, start, end))
        }
        RangeDecision::Unsatisfiable => Err(HttpError::RangeNotSatisfiable { size }),
    }
}

/// Serves a hot-NAR entry's file: exact length, ranges, its own hash as the validator.
async fn serve_cached(
    state: &AppState,
    conn: Option<&Conn>,
    method: &Method,
    headers: &HeaderMap,
    hash: crate::nix::store_path::StorePathHash,
    entry: &crate::store::nar_cache::Entry,
) -> HttpResult<Option<Response>> {
    let mut resp_headers = HeaderMap::new();
    resp_headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/x-nix-nar"));
    resp_headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("public, max-age=31536000, immutable"));
    resp_headers.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    let etag = format!("\"{}\"", entry.file_hash.strip_prefix("sha256:").unwrap_or(&entry.file_hash));
    if let Ok(v) = HeaderValue::from_str(&etag) {
        resp_headers.insert(header::ETAG, v);
    }
    let (status, start, end) = ranged(headers, &etag, entry.file_size, &mut resp_headers)?;
    resp_headers.insert(header::CONTENT_LENGTH, HeaderValue::from(end - start));
    let slots = match *method {
        Method::HEAD => vec![],
        _ => state.streams.acquire(conn, headers, &[&state.streams.nar], "too many NAR downloads").await?,
    };
    // HEAD opens the file too: it answers only for an entry that GET would serve.
    let Some(stream) = state.store.cached_nar_stream(hash, entry, start, end, ()).await? else { return Ok(None) };
    state.metrics.nar_cache_hits.inc();
    if *method == Method::HEAD {
        return Ok(Some((status, resp_headers).into_response()));
    }
    let body = SlotBody::new(NarBody::new(stream, Some(end - start), state.metrics.clone(), true), slots);
    Ok(Some((status, resp_headers, Body::new(body)).into_response()))
}

/// A streamed NAR body with an exact size hint where the length is known, counting bytes sent
/// and keeping the in-flight gauge up while it lives.
struct NarBody {
    rx: NarStream,
    remaining: Option<u64>,
    metrics: Arc<Metrics>,
    /// Served from the hot-NAR store.
    cached: bool,
}

impl NarBody {
    fn new(rx: NarStream, length: Option<u64>, metrics: Arc<Metrics>, cached: bool) -> Self {
        metrics.nars_in_flight.inc();
        Self { rx, remaining: length, metrics, cached }
    }
}

impl Drop for NarBody {
    fn drop(&mut self) {
        self.metrics.nars_in_flight.dec();
    }
}

impl http_body::Body for NarBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if self.remaining == Some(0) {
            return Poll::Ready(None);
        }
        match Pin::new(&mut self.rx).poll_next(cx) {
            Poll::Ready(Some(Ok(chunk))) => {
                let n = chunk.len() as u64;
                if let Some(rem) = self.remaining.as_mut() {
                    if n > *rem {
                        return Poll::Ready(Some(Err(std::io::Error::other("NAR longer than its NarSize"))));
                    }
                    *rem -= n;
                }
                self.metrics.nar_bytes_sent.inc_by(n);
                if self.cached {
                    self.metrics.nar_cache_bytes_sent.inc_by(n);
                }
                Poll::Ready(Some(Ok(Frame::data(chunk))))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e))),
            Poll::Ready(None) => match self.remaining {
                // Ending short of Content-Length would make hyper hang up anyway; say why.
                Some(rem) if rem > 0 => Poll::Ready(Some(Err(std::io::Error::other("NAR shorter than its NarSize")))),
                _ => Poll::Ready(None),
            },
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == Some(0)
    }

    fn size_hint(&self) -> SizeHint {
        match self.remaining {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}
