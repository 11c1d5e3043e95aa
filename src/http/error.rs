//! `HttpError`, the single place where an error becomes a status code.
//!
//! Clients get the status and a short reason, never a path or an OS error; 5xx details go to the
//! log at `error`, 4xx at `debug`. The match is exhaustive so that a new variant forces a decision.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("bad request: {0}")]
    BadRequest(&'static str),
    #[error("not found")]
    NotFound,
    #[error("range not satisfiable")]
    RangeNotSatisfiable { size: u64 },
    /// Too many streams of this kind at once; the client should retry shortly.
    #[error("busy: {0}")]
    Busy(&'static str),
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The read-through bucket did not answer; the client should retry shortly.
    #[error("bucket unavailable: {0}")]
    Bucket(String),
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        let (status, body): (StatusCode, &str) = match &self {
            HttpError::BadRequest(why) => (StatusCode::BAD_REQUEST, why),
            HttpError::NotFound => (StatusCode::NOT_FOUND, "not found"),
            HttpError::RangeNotSatisfiable { .. } => (StatusCode::RANGE_NOT_SATISFIABLE, "range not satisfiable"),
            HttpError::Store(StoreError::Unavailable(_)) => {
                (StatusCode::SERVICE_UNAVAILABLE, "store temporarily unavailable")
            }
            HttpError::Busy(why) => (StatusCode::SERVICE_UNAVAILABLE, why),
            HttpError::Bucket(_) => (StatusCode::SERVICE_UNAVAILABLE, "cache bucket temporarily unavailable"),
            HttpError::Store(StoreError::Database(_) | StoreError::Corrupt(_) | StoreError::Io(_)) => {
                (StatusCode::INTERNAL_SERVER_ERROR, "internal error")
            }
        };
        if matches!(self, HttpError::Busy(_)) {
            tracing::warn!(err = %self, "request refused: at a configured limit");
        } else if status.is_server_error() {
            tracing::error!(err = %self, "request failed");
        } else {
            tracing::debug!(err = %self, "request refused");
        }
        let mut resp = (status, format!("{body}\n")).into_response();
        let headers = resp.headers_mut();
        // A miss may become a hit at any moment (a build finishes): never let it be cached.
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        match self {
            HttpError::RangeNotSatisfiable { size } => {
                if let Ok(v) = HeaderValue::from_str(&format!("bytes */{size}")) {
                    headers.insert(header::CONTENT_RANGE, v);
                }
            }
            HttpError::Store(StoreError::Unavailable(_)) | HttpError::Bucket(_) => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
            }
            HttpError::Busy(_) => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static("2"));
            }
            _ => {}
        }
        resp
    }
}

pub type HttpResult<T> = Result<T, HttpError>;
