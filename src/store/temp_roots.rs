//! Temp roots that keep paths alive while their NARs stream.
//!
//! A temp root lives as long as the daemon connection that added it. Streams share one
//! connection; each [`TempRoot`] keeps it open, and so does a timer until [`IDLE`] after the
//! last root was added to it, so a connection (and every root on it) closes when both the last
//! stream using it and its idle time have ended. A connection takes roots for [`MAX_AGE`] at
//! most, so a served path is pinned while its stream runs and at most [`MAX_AGE`] + [`IDLE`]
//! longer; [`IDLE`] longer on a cache that went quiet. Every stream adds its root, even for a
//! path rooted on the same connection already: that round trip is also what tells a daemon that
//! went away (the request is then a 503, never served unprotected).
//!
//! Opening a daemon connection costs milliseconds (the daemon forks and handshakes), so it never
//! happens on a request's path once the first connection is up: the next connection is opened
//! in the background as soon as one is taken into use, and a connection past its limits
//! ([`MAX_AGE`], [`ROOTS_PER_CONNECTION`]) goes on taking roots until that spare is ready.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use tokio::sync::Mutex;
use tokio::task::JoinHandle;

use super::StoreError;
use super::daemon::{Connection, DaemonError};

/// Roots added to one connection before the next one is taken.
const ROOTS_PER_CONNECTION: usize = 256;
/// Age after which the next connection is taken.
const MAX_AGE: Duration = Duration::from_secs(60);
/// A connection stays open this long after its last root was added (for the next request's).
const IDLE: Duration = Duration::from_secs(5);

type Shared = Arc<Mutex<Connection>>;

struct Holder {
    /// Weak: the streams and the connection's timer keep it alive.
    conn: Weak<Mutex<Connection>>,
    /// Roots added to it.
    roots: usize,
    opened: Instant,
    /// When its last root was added (its timer reads it).
    used: Arc<std::sync::Mutex<tokio::time::Instant>>,
}

impl Holder {
    /// Keeps it open [`IDLE`] from now.
    fn touch(&self) {
        *self.used.lock().unwrap_or_else(|e| e.into_inner()) = tokio::time::Instant::now();
    }

    fn fresh(&self) -> bool {
        self.roots < ROOTS_PER_CONNECTION && self.opened.elapsed() <= MAX_AGE
    }
}

#[derive(Default)]
struct State {
    current: Option<Holder>,
    /// The next connection, being opened (or open and waiting).
    spare: Option<JoinHandle<Result<Connection, DaemonError>>>,
}

pub(super) struct TempRoots {
    socket: PathBuf,
    state: Mutex<State>,
    /// Connections opened so far (for `/metrics`).
    opened: Arc<AtomicU64>,
}

/// Keeps a path from being garbage-collected while it is alive.
pub struct TempRoot {
    _conn: Shared,
}

impl TempRoots {
    pub(super) fn new(socket: PathBuf) -> Self {
        Self { socket, state: Mutex::new(State::default()), opened: Arc::default() }
    }

    pub(super) fn connections_opened(&self) -> u64 {
        self.opened.load(Ordering::Relaxed)
    }

    pub(super) async fn add(&self, path: &str) -> Result<TempRoot, StoreError> {
        let mut state = self.state.lock().await;
        // A held connection may have died with a restarted daemon: then try once on a new one.
        for attempt in 0..2 {
            let conn = self.connection(&mut state).await?;
            let result = conn.lock().await.add_temp_root(path).await;
            match result {
                Ok(()) => {
                    if let Some(h) = state.current.as_mut() {
                        h.roots += 1;
                        h.touch();
                    }
                    return Ok(TempRoot { _conn: conn });
                }
                Err(e) => {
                    // The connection is out of sync or gone, and the spare may have gone with
                    // the same daemon: never reuse either.
                    state.current = None;
                    if let Some(spare) = state.spare.take() {
                        spare.abort();
                    }
                    if attempt == 1 || !matches!(e, DaemonError::Io(_)) {
                        return Err(e.into());
                    }
                }
            }
        }
        Err(StoreError::Unavailable("no daemon connection for temp roots".into()))
    }

    /// The connection to add a root on: the current one while it is fresh (or while the next
    /// one is still being opened), else the spare, else a new one.
    async fn connection(&self, state: &mut State) -> Result<Shared, StoreError> {
        let live = state.current.as_ref().and_then(|h| Some((h.fresh(), h.conn.upgrade()?)));
        let spare_ready = state.spare.as_ref().is_some_and(|s| s.is_finished());
        if let Some((fresh, conn)) = live
            && (fresh || !spare_ready)
        {
            return Ok(conn);
        }
        // A spare (ready, or nearly: nothing else can serve now), else a connection of our own.
        let opened = match state.spare.take() {
            Some(spare) => spare.await.ok().and_then(Result::ok),
            None => None,
        };
        let conn = match opened {
            Some(conn) => conn,
            None => {
                let conn = Connection::connect(&self.socket).await?;
                self.opened.fetch_add(1, Ordering::Relaxed);
                conn
            }
        };
        let conn = Arc::new(Mutex::new(conn));
        let used = Arc::new(std::sync::Mutex::new(tokio::time::Instant::now()));
        tokio::spawn(keep_open(conn.clone(), used.clone()));
        state.current = Some(Holder { conn: Arc::downgrade(&conn), roots: 0, opened: Instant::now(), used });
        let (socket, opened) = (self.socket.clone(), self.opened.clone());
        state.spare = Some(tokio::spawn(async move {
            let conn = Connection::connect(&socket).await;
            if conn.is_ok() {
                opened.fetch_add(1, Ordering::Relaxed);
            }
            conn
        }));
        Ok(conn)
    }
}

/// Holds `conn` open until [`IDLE`] after the last root added to it (`used`).
async fn keep_open(conn: Shared, used: Arc<std::sync::Mutex<tokio::time::Instant>>) {
    loop {
        let until = *used.lock().unwrap_or_else(|e| e.into_inner()) + IDLE;
        if until <= tokio::time::Instant::now() {
            break;
        }
        tokio::time::sleep_until(until).await;
    }
    drop(conn);
}
