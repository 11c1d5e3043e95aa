//! `GET /log/<drv>` and `GET /realisations/<id>.doi`: build logs and CA realisations.

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};

use super::AppState;
use super::error::{HttpError, HttpResult};
use crate::nix::http_path;

pub(super) async fn log(State(state): State<AppState>, Path(file): Path<String>) -> HttpResult<Response> {
    let drv = http_path::parse_log(&file).ok_or(HttpError::BadRequest("malformed derivation name"))?;
    let log = state.store.build_log(&drv).await?.ok_or(HttpError::NotFound)?;
    Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], Body::from_stream(log)).into_response())
}

pub(super) async fn realisation(State(state): State<AppState>, Path(file): Path<String>) -> HttpResult<Response> {
    let id = http_path::parse_realisation(&file).ok_or(HttpError::BadRequest("malformed realisation id"))?;
    let doc = state.store.realisation(&id.drv_hash, &id.output).await?.ok_or(HttpError::NotFound)?;
    Ok(([(header::CONTENT_TYPE, "application/json")], doc).into_response())
}
