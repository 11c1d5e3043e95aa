//! `GET /nix-cache-info`, `/health` and `/version`.

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;

use super::AppState;

pub(super) async fn get(State(state): State<AppState>) -> impl IntoResponse {
    let body = format!("StoreDir: {}\nWantMassQuery: 1\nPriority: {}\n", state.store.store_dir(), state.cache.priority);
    ([(header::CONTENT_TYPE, "text/x-nix-cache-info")], body)
}

pub(super) async fn health() -> &'static str {
    "ok\n"
}

pub(super) async fn version() -> String {
    format!("hearth {}\n", env!("CARGO_PKG_VERSION"))
}
