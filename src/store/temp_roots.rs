//! Temp roots that keep paths alive while their NARs stream.
//!
//! A temp root lives as long as the daemon connection that added it. Concurrent streams share one
//! connection; each [`TempRoot`] keeps it open and nothing else does, so the connection (and every
//! root on it) closes when the last stream using it ends. A connection takes new roots only for a
//! while ([`MAX_AGE`], [`ROOTS_PER_CONNECTION`]), so under steady load old connections drain and
//! close too: a served path is pinned only while some stream that shares its connection runs.

use std::path::PathBuf;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use tokio::sync::Mutex;

use super::StoreError;
use super::daemon::{Connection, DaemonError};

/// Roots added to one connection before a fresh one is opened.
const ROOTS_PER_CONNECTION: usize = 256;
/// Age after which a fresh connection is opened.
const MAX_AGE: Duration = Duration::from_secs(60);

struct Holder {
    /// Weak: only the streams keep a connection alive.
    conn: Weak<Mutex<Connection>>,
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
            let live = current
                .as_ref()
                .filter(|h| h.roots < ROOTS_PER_CONNECTION && h.opened.elapsed() <= MAX_AGE)
                .and_then(|h| h.conn.upgrade());
            let conn = match live {
                Some(conn) => conn,
                None => {
                    let conn = Arc::new(Mutex::new(Connection::connect(&self.socket).await?));
                    *current = Some(Holder { conn: Arc::downgrade(&conn), roots: 0, opened: Instant::now() });
                    conn
                }
            };
            let result = conn.lock().await.add_temp_root(path).await;
            match result {
                Ok(()) => {
                    if let Some(h) = current.as_mut() {
                        h.roots += 1;
                    }
                    return Ok(TempRoot { _conn: conn });
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
