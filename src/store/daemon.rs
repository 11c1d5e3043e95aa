//! Our client of the Nix daemon worker protocol (1.21 to 1.38) over its unix socket, and a
//! bounded pool of connections.
//!
//! One op at a time per connection. A daemon error inside an op leaves the connection usable; any
//! other failure (I/O, a reply we cannot parse) drops it, so a restarted daemon is reconnected to
//! on the next request. Lengths read from the daemon are bounded before anything is allocated.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::nix::wire::{self, Op, Request};

/// How long connecting and one op may take before the daemon counts as unavailable.
const OP_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("cannot reach the nix daemon: {0}")]
    Connect(std::io::Error),
    #[error("nix daemon I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("nix daemon protocol: {0}")]
    Protocol(String),
    #[error("nix daemon: {0}")]
    Remote(String),
    #[error("nix daemon did not answer in time")]
    Timeout,
}

/// Path info as the daemon reports it; hashes are `sha256:<hex>` or as the daemon gives them.
#[derive(Debug, Clone)]
pub struct DaemonPathInfo {
    pub deriver: String,
    pub nar_hash: String,
    pub references: Vec<String>,
    pub registration_time: u64,
    pub nar_size: u64,
    pub sigs: Vec<String>,
    pub ca: String,
}

/// One open connection after the handshake.
pub struct Connection {
    r: BufReader<OwnedReadHalf>,
    w: BufWriter<OwnedWriteHalf>,
    version: u64,
}

impl Connection {
    pub async fn connect(socket: &std::path::Path) -> Result<Self, DaemonError> {
        let stream = UnixStream::connect(socket).await.map_err(DaemonError::Connect)?;
        let (r, w) = stream.into_split();
        let mut c = Self { r: BufReader::new(r), w: BufWriter::new(w), version: 0 };
        let daemon_nix = tokio::time::timeout(OP_TIMEOUT, c.handshake()).await.map_err(|_| DaemonError::Timeout)??;
        tracing::debug!(
            protocol = %format_args!("{}.{}", wire::major(c.version), wire::minor(c.version)),
            daemon = daemon_nix.as_deref().unwrap_or("(not said before protocol 1.33)"),
            "connected to the nix-daemon"
        );
        Ok(c)
    }

    /// The negotiated protocol version.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// Returns the daemon's Nix version where the protocol says it (1.33+).
    async fn handshake(&mut self) -> Result<Option<String>, DaemonError> {
        self.w.write_all(&Request::default().u64(wire::WORKER_MAGIC_1).0).await?;
        self.w.flush().await?;
        if self.u64().await? != wire::WORKER_MAGIC_2 {
            return Err(DaemonError::Protocol("bad magic from the daemon".into()));
        }
        let server = self.u64().await?;
        if wire::major(server) != 1 || server < wire::MIN_VERSION {
            return Err(DaemonError::Protocol(format!(
                "daemon protocol {}.{} is not supported (1.21 or newer)",
                wire::major(server),
                wire::minor(server)
            )));
        }
        self.version = server.min(wire::CLIENT_VERSION);
        let minor = wire::minor(self.version);
        self.w.write_all(&Request::default().u64(wire::CLIENT_VERSION).0).await?;
        if minor >= 38 {
            // Feature negotiation comes right after the versions: we offer none and ignore the
            // daemon's list.
            self.w.write_all(&Request::default().strs(&[]).0).await?;
            self.w.flush().await?;
            self.strs().await?;
        }
        let mut req = Request::default();
        if minor >= 14 {
            req.u64(0); // no CPU affinity
        }
        if minor >= 11 {
            req.u64(0); // reserveSpace
        }
        self.w.write_all(&req.0).await?;
        self.w.flush().await?;
        let daemon_nix = if minor >= 33 { Some(self.string().await?) } else { None };
        if minor >= 35 {
            self.u64().await?; // trusted status
        }
        self.stderr_loop().await?;
        Ok(daemon_nix)
    }

    async fn u64(&mut self) -> Result<u64, DaemonError> {
        Ok(self.r.read_u64_le().await?)
    }

    async fn bytes(&mut self) -> Result<Vec<u8>, DaemonError> {
        let len = self.u64().await?;
        if len > wire::MAX_STRING_LEN {
            return Err(DaemonError::Protocol(format!("string of {len} bytes from the daemon")));
        }
        let padded = (len + crate::nix::nar::padding(len)) as usize;
        let mut buf = vec![0u8; padded];
        self.r.read_exact(&mut buf).await?;
        if buf[len as usize..].iter().any(|&b| b != 0) {
            return Err(DaemonError::Protocol("non-zero padding".into()));
        }
        buf.truncate(len as usize);
        Ok(buf)
    }

    async fn string(&mut self) -> Result<String, DaemonError> {
        String::from_utf8(self.bytes().await?).map_err(|_| DaemonError::Protocol("a string is not UTF-8".into()))
    }

    async fn strs(&mut self) -> Result<Vec<String>, DaemonError> {
        let n = self.u64().await?;
        if n > wire::MAX_LIST_LEN {
            return Err(DaemonError::Protocol(format!("list of {n} entries from the daemon")));
        }
        let mut out = Vec::with_capacity(n.min(1024) as usize);
        for _ in 0..n {
            out.push(self.string().await?);
        }
        Ok(out)
    }

    async fn fields(&mut self) -> Result<(), DaemonError> {
        let n = self.u64().await?;
        if n > wire::MAX_LIST_LEN {
            return Err(DaemonError::Protocol("too many activity fields".into()));
        }
        for _ in 0..n {
            match self.u64().await? {
                0 => {
                    self.u64().await?;
                }
                1 => {
                    self.bytes().await?;
                }
                t => return Err(DaemonError::Protocol(format!("activity field type {t}"))),
            }
        }
        Ok(())
    }

    /// Reads log messages until LAST; an ERROR becomes [`DaemonError::Remote`].
    async fn stderr_loop(&mut self) -> Result<(), DaemonError> {
        loop {
            match self.u64().await? {
                wire::STDERR_LAST => return Ok(()),
                wire::STDERR_NEXT => {
                    self.bytes().await?;
                }
                wire::STDERR_ERROR => {
                    let msg = if wire::minor(self.version) >= 26 {
                        self.string().await?; // type
                        self.u64().await?; // level
                        self.string().await?; // name
                        let msg = self.string().await?;
                        if self.u64().await? != 0 {
                            return Err(DaemonError::Protocol("error with a position".into()));
                        }
                        let traces = self.u64().await?;
                        if traces > wire::MAX_LIST_LEN {
                            return Err(DaemonError::Protocol("too many traces".into()));
                        }
                        for _ in 0..traces {
                            self.u64().await?;
                            self.bytes().await?;
                        }
                        msg
                    } else {
                        let msg = self.string().await?;
                        self.u64().await?; // exit status
                        msg
                    };
                    return Err(DaemonError::Remote(msg));
                }
                wire::STDERR_START_ACTIVITY => {
                    self.u64().await?; // id
                    self.u64().await?; // level
                    self.u64().await?; // type
                    self.bytes().await?; // text
                    self.fields().await?;
                    self.u64().await?; // parent
                }
                wire::STDERR_STOP_ACTIVITY => {
                    self.u64().await?;
                }
                wire::STDERR_RESULT => {
                    self.u64().await?;
                    self.u64().await?;
                    self.fields().await?;
                }
                other => return Err(DaemonError::Protocol(format!("unknown stderr message {other:#x}"))),
            }
        }
    }

    async fn send(&mut self, req: Request) -> Result<(), DaemonError> {
        self.w.write_all(&req.0).await?;
        self.w.flush().await?;
        self.stderr_loop().await
    }

    /// `QueryPathFromHashPart`: the full path with this hash part, if valid.
    pub async fn query_path_from_hash_part(&mut self, hash: &str) -> Result<Option<String>, DaemonError> {
        let mut req = Request::op(Op::QueryPathFromHashPart);
        req.str(hash);
        self.send(req).await?;
        let path = self.string().await?;
        Ok((!path.is_empty()).then_some(path))
    }

    /// `QueryPathInfo`: `None` when the path is not valid.
    pub async fn query_path_info(&mut self, path: &str) -> Result<Option<DaemonPathInfo>, DaemonError> {
        let mut req = Request::op(Op::QueryPathInfo);
        req.str(path);
        match self.send(req).await {
            Ok(()) => {}
            // Before 1.17 an invalid path was an error; keep the connection (it is still in sync).
            Err(DaemonError::Remote(msg)) if msg.contains("is not valid") => return Ok(None),
            Err(e) => return Err(e),
        }
        if self.u64().await? == 0 {
            return Ok(None);
        }
        Ok(Some(DaemonPathInfo {
            deriver: self.string().await?,
            nar_hash: self.string().await?,
            references: self.strs().await?,
            registration_time: self.u64().await?,
            nar_size: self.u64().await?,
            sigs: {
                self.u64().await?; // ultimate
                self.strs().await?
            },
            ca: self.string().await?,
        }))
    }

    /// `IsValidPath`.
    pub async fn is_valid_path(&mut self, path: &str) -> Result<bool, DaemonError> {
        let mut req = Request::op(Op::IsValidPath);
        req.str(path);
        self.send(req).await?;
        Ok(self.u64().await? != 0)
    }

    /// `AddIndirectRoot`: the symlink `link` (outside the store) becomes a GC root of the store
    /// path it points to, for as long as it exists.
    pub async fn add_indirect_root(&mut self, link: &str) -> Result<(), DaemonError> {
        let mut req = Request::op(Op::AddIndirectRoot);
        req.str(link);
        self.send(req).await?;
        self.u64().await?;
        Ok(())
    }

    /// `AddTempRoot`: the path cannot be garbage-collected while this connection lives.
    pub async fn add_temp_root(&mut self, path: &str) -> Result<(), DaemonError> {
        let mut req = Request::op(Op::AddTempRoot);
        req.str(path);
        self.send(req).await?;
        self.u64().await?;
        Ok(())
    }
}

/// A bounded pool of daemon connections.
pub struct Pool {
    socket: PathBuf,
    idle: Mutex<Vec<Connection>>,
    permits: Arc<Semaphore>,
    size: usize,
}

/// A connection taken from the pool; it goes back when dropped unless an error poisoned it.
pub struct Pooled<'a> {
    pool: &'a Pool,
    conn: Option<Connection>,
    _permit: OwnedSemaphorePermit,
}

impl Pool {
    pub fn new(socket: PathBuf, size: usize) -> Self {
        let size = size.max(1);
        Self { socket, idle: Mutex::new(Vec::new()), permits: Arc::new(Semaphore::new(size)), size }
    }

    pub fn socket(&self) -> &std::path::Path {
        &self.socket
    }

    /// Connections in use right now.
    pub fn in_use(&self) -> usize {
        self.size - self.permits.available_permits()
    }

    pub fn size(&self) -> usize {
        self.size
    }

    async fn get(&self) -> Result<Pooled<'_>, DaemonError> {
        let permit = self.permits.clone().acquire_owned().await.map_err(|_| DaemonError::Timeout)?;
        let idle = self.idle.lock().map(|mut v| v.pop()).unwrap_or(None);
        let conn = match idle {
            Some(c) => c,
            None => Connection::connect(&self.socket).await?,
        };
        Ok(Pooled { pool: self, conn: Some(conn), _permit: permit })
    }

    /// Runs `op` on a pooled connection under the op timeout. A pooled connection that fails with
    /// I/O (the daemon restarted) is dropped and the op is tried once more on a fresh one.
    pub async fn run<T, F>(&self, op: F) -> Result<T, DaemonError>
    where
        F: for<'c> Fn(&'c mut Connection) -> futures::future::BoxFuture<'c, Result<T, DaemonError>>,
    {
        for attempt in 0..2 {
            let mut pooled = self.get().await?;
            let Some(conn) = pooled.conn.as_mut() else {
                return Err(DaemonError::Protocol("pooled connection missing".into()));
            };
            let result = tokio::time::timeout(OP_TIMEOUT, op(conn)).await.unwrap_or(Err(DaemonError::Timeout));
            match result {
                Ok(v) => return Ok(v),
                Err(e) => {
                    // After a daemon-side error the daemon may close the connection, so no
                    // failed connection goes back to the pool.
                    pooled.conn = None;
                    if attempt == 1 || !matches!(e, DaemonError::Io(_)) {
                        return Err(e);
                    }
                    tracing::debug!(err = %e, "daemon connection lost; reconnecting");
                }
            }
        }
        Err(DaemonError::Timeout)
    }
}

impl Drop for Pooled<'_> {
    fn drop(&mut self) {
        if let (Some(conn), Ok(mut idle)) = (self.conn.take(), self.pool.idle.lock()) {
            idle.push(conn);
        }
    }
}
