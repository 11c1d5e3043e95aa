//! Read-only access to the Nix database (`db.sqlite`), in `spawn_blocking`.
//!
//! One indexed query per lookup (path, hash, size, deriver, signatures, CA and the references in
//! one statement). The database is opened read-only, never written; SQLite's WAL lets Nix write
//! while we read. A lookup first runs on the calling thread's own connection without waiting for
//! any lock (tens of microseconds, no thread hop); only if SQLite is busy does it move to a
//! blocking thread that may wait. This module knows SQL, never HTTP.

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rusqlite::{Connection, OpenFlags, OptionalExtension};

use super::StoreError;

/// A row of `ValidPaths` with its references.
#[derive(Debug, Clone)]
pub struct DbRow {
    pub path: String,
    pub hash: String,
    pub registration_time: i64,
    pub deriver: Option<String>,
    pub nar_size: Option<i64>,
    pub sigs: Option<String>,
    pub ca: Option<String>,
    /// Full reference paths, space-separated.
    pub references: Option<String>,
}

const BY_HASH: &str = "SELECT v.path, v.hash, v.registrationTime, v.deriver, v.narSize, v.sigs, v.ca,
       (SELECT group_concat(r.path, ' ') FROM Refs JOIN ValidPaths r ON r.id = Refs.reference
         WHERE Refs.referrer = v.id)
  FROM ValidPaths v WHERE v.path >= ?1 ORDER BY v.path LIMIT 1";

const REALISATION: &str = "SELECT v.path, r.signatures FROM Realisations r JOIN ValidPaths v ON v.id = r.outputPath
  WHERE r.drvPath = ?1 AND r.outputName = ?2";

thread_local! {
    /// Each runtime thread's own connection for lookups that never wait, by database path.
    static INLINE: RefCell<Option<(PathBuf, Connection)>> = const { RefCell::new(None) };
}

fn is_busy(e: &rusqlite::Error) -> bool {
    matches!(e.sqlite_error_code(), Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked))
}

fn read_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<DbRow> {
    Ok(DbRow {
        path: r.get(0)?,
        hash: r.get(1)?,
        registration_time: r.get(2)?,
        deriver: r.get(3)?,
        nar_size: r.get(4)?,
        sigs: r.get(5)?,
        ca: r.get(6)?,
        references: r.get(7)?,
    })
}

/// A small set of read-only connections, reused across blocking tasks.
#[derive(Clone)]
pub struct Db {
    path: PathBuf,
    idle: Arc<Mutex<Vec<Connection>>>,
}

impl Db {
    /// Opens the database once to check that it is readable and has Nix's schema.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = Self { path: path.to_owned(), idle: Arc::default() };
        let conn = db.connect()?;
        conn.prepare_cached(BY_HASH).map_err(|e| StoreError::Database(e.to_string()))?;
        db.put_back(conn);
        Ok(db)
    }

    fn connect(&self) -> Result<Connection, StoreError> {
        let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX | OpenFlags::SQLITE_OPEN_URI;
        let conn = Connection::open_with_flags(&self.path, flags).map_err(|e| StoreError::Database(e.to_string()))?;
        // Nix holds write locks briefly; wait rather than fail.
        conn.busy_timeout(std::time::Duration::from_secs(5)).map_err(|e| StoreError::Database(e.to_string()))?;
        Ok(conn)
    }

    fn put_back(&self, conn: Connection) {
        if let Ok(mut idle) = self.idle.lock()
            && idle.len() < 16
        {
            idle.push(conn);
        }
    }

    async fn with_conn<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        let db = self.clone();
        {
            tokio::task::spawn_blocking(move || {
                let conn = match db.idle.lock().ok().and_then(|mut v| v.pop()) {
                    Some(c) => c,
                    None => db.connect()?,
                };
                let result = f(&conn).map_err(|e| StoreError::Database(e.to_string()));
                if result.is_ok() {
                    db.put_back(conn);
                }
                result
            })
            .await
            .map_err(|e| StoreError::Database(format!("database task failed: {e}")))?
        }
    }

    /// Runs a lookup on this thread's own connection, never waiting for a lock; `None` when
    /// SQLite is busy (the caller then waits on a blocking thread) or no connection opens.
    fn inline<T>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> Option<Result<T, StoreError>> {
        INLINE.with(|cell| {
            let mut slot = cell.try_borrow_mut().ok()?;
            if slot.as_ref().is_none_or(|(p, _)| p != &self.path) {
                let conn = self.connect().ok()?;
                conn.busy_timeout(std::time::Duration::ZERO).ok()?;
                *slot = Some((self.path.clone(), conn));
            }
            let (_, conn) = slot.as_ref()?;
            match f(conn) {
                Err(e) if is_busy(&e) => None,
                Err(e) => {
                    // Reopen next time: the error may have been the connection's.
                    *slot = None;
                    Some(Err(StoreError::Database(e.to_string())))
                }
                Ok(v) => Some(Ok(v)),
            }
        })
    }

    /// The row whose path starts with `<store_dir>/<hash>-`, if any.
    pub async fn by_hash_part(&self, store_dir: &str, hash: &str) -> Result<Option<DbRow>, StoreError> {
        let prefix = format!("{store_dir}/{hash}");
        let dashed = format!("{prefix}-");
        let query =
            |conn: &Connection, prefix: &str| conn.prepare_cached(BY_HASH)?.query_row([prefix], read_row).optional();
        let row = match self.inline(|conn| query(conn, &prefix)) {
            Some(result) => result?,
            None => self.with_conn(move |conn| query(conn, &prefix)).await?,
        };
        Ok(row.filter(|r| r.path.starts_with(&dashed)))
    }

    /// The output path and signatures of a CA realisation, where the store has the table and row.
    pub async fn realisation(
        &self,
        drv_hash: &str,
        output: &str,
    ) -> Result<Option<(String, Option<String>)>, StoreError> {
        let (drv_hash, output) = (drv_hash.to_owned(), output.to_owned());
        self.with_conn(move |conn| {
            let has_table: bool = conn
                .query_row(
                    "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'Realisations'",
                    [],
                    |r| r.get::<_, i64>(0),
                )
                .map(|n| n > 0)?;
            if !has_table {
                return Ok(None);
            }
            conn.prepare_cached(REALISATION)?.query_row([&drv_hash, &output], |r| Ok((r.get(0)?, r.get(1)?))).optional()
        })
        .await
    }
}
