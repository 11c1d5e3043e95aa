//! `GET /log/<drv>` and `GET /realisations/<id>.doi`: build logs and CA realisations.

use axum::body::Body;
use axum::extract::{Extension, Path, State};
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};

use super::AppState;
use super::error::{HttpError, HttpResult};
use super::slots::{Conn, SlotBody};
use crate::nix::http_path;

/// A log streams (decompressed as it goes) under the NAR streams' bound and a smaller one of its
/// own, with the same fairness: see [`super::slots`].
pub(super) async fn log(
    State(state): State<AppState>,
    conn: Option<Extension<Conn>>,
    headers: HeaderMap,
    Path(file): Path<String>,
) -> HttpResult<Response> {
    let drv = http_path::parse_log(&file).ok_or(HttpError::BadRequest("malformed derivation name"))?;
    let streams = &state.streams;
    let slots =
        streams.acquire(conn.as_deref(), &headers, &[&streams.nar, &streams.log], "too many log downloads").await?;
    let log = state.store.build_log(&drv).await?.ok_or(HttpError::NotFound)?;
    let body = SlotBody::new(Body::from_stream(log), slots);
    Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], Body::new(body)).into_response())
}

pub(super) async fn realisation(State(state): State<AppState>, Path(file): Path<String>) -> HttpResult<Response> {
    let id = http_path::parse_realisation(&file).ok_or(HttpError::BadRequest("malformed realisation id"))?;
    let doc = state.store.realisation(&id.drv_hash, &id.output).await?.ok_or(HttpError::NotFound)?;
    Ok(([(header::CONTENT_TYPE, "application/json")], doc).into_response())
}
