//! Temp roots that keep paths alive while their NARs stream.
//!
//! A temp root lives as long as the daemon connection that added it. Roots are added on one
//! shared connection that is replaced after a while; each [`TempRoot`] keeps its connection open,
//! so a connection (and its roots) closes when the last stream using it ends. That bounds both
//! the number of daemon connections and how long a served path stays pinned.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Mutex;

use super::StoreError;
use super::daemon::{Connection, DaemonError};

/// Roots added to one connection before a fresh one is opened.
const ROOTS_PER_CONNECTION: usize = 256;
/// Age after which a fresh connection is opened.
const MAX_AGE: Duration = Duration::from_secs(60);

struct Holder {
    conn: Arc<Mutex<Connection>>,
    roots: usize,
    opened: Instant,
}

pub(super) struct TempRoots {
    socket: PathBuf,
    current: Mutex<Option<Holder>>,
}

/// Keeps a path from being garbage-collected while it is alive.
pub struct TempRoot {
    _conn: Arc<Mutex<Connection>>,
}

impl TempRoots {
    pub(super) fn new(socket: PathBuf) -> Self {
        Self { socket, current: Mutex::new(None) }
    }

    pub(super) async fn add(&self, path: &str) -> Result<TempRoot, StoreError> {
        let mut current = self.current.lock().await;
        // A held connection may have died with a restarted daemon: then try once on a new one.
        for attempt in 0..2 {
            let stale =
                current.as_ref().is_none_or(|h| h.roots >= ROOTS_PER_CONNECTION || h.opened.elapsed() > MAX_AGE);
            if stale {
                let conn = Connection::connect(&self.socket).await?;
                *current = Some(Holder { conn: Arc::new(Mutex::new(conn)), roots: 0, opened: Instant::now() });
            }
            let Some(holder) = current.as_mut() else { break };
            let result = holder.conn.lock().await.add_temp_root(path).await;
            match result {
                Ok(()) => {
                    holder.roots += 1;
                    return Ok(TempRoot { _conn: holder.conn.clone() });
                }
                Err(e) => {
                    // The connection is out of sync or gone; never reuse it.
                    *current = None;
                    if attempt == 1 || !matches!(e, DaemonError::Io(_)) {
                        return Err(e.into());
                    }
                }
            }
        }
        Err(StoreError::Unavailable("no daemon connection for temp roots".into()))
    }
}
