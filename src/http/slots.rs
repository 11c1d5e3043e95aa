//! Fair bounds on response streams (NAR downloads, compressed ones, build logs): a bound that
//! idle sockets cannot turn into an outage.
//!
//! Each bound has a capacity and a per-client share. A stream holds a [`Slot`] while it lives and
//! marks it each time its client takes a chunk. When a request finds the bound (or its client's
//! share) full, the stream whose client has gone longest without reading, past
//! [`StreamLimits::min_idle`](super::StreamLimits), gives its slot up: its connection is closed
//! and the new request takes the slot. Only when every stream is being read does a request get
//! `503`. A client is its peer address, or for a trusted proxy (loopback and unix sockets by
//! default) the address the proxy put in `X-Forwarded-For`.
//!
//! Knows nothing of NARs or the store: what a slot guards is the caller's.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use prometheus_client::metrics::counter::Counter;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// One accepted connection, as every request on it sees it (a request extension).
#[derive(Debug, Clone)]
pub struct Conn {
    /// The TCP peer; `None` on a unix socket (a local proxy).
    pub peer: Option<IpAddr>,
    /// Cancelled to close the connection (its stream gave its slot up).
    pub close: CancellationToken,
}

impl Conn {
    pub fn new(peer: Option<IpAddr>) -> Self {
        Self { peer, close: CancellationToken::new() }
    }

    /// The client this request counts against: the peer, or for a trusted proxy the rightmost
    /// `X-Forwarded-For` address that is not itself a trusted proxy.
    pub fn client(&self, headers: &HeaderMap, trusted: &[IpAddr]) -> IpAddr {
        let is_trusted = |ip: &IpAddr| trusted.contains(ip);
        if self.peer.as_ref().is_some_and(|p| !is_trusted(p)) {
            return self.peer.unwrap_or(LOCAL);
        }
        let forwarded = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|a| a.trim().parse::<IpAddr>().ok().map(|a| a.to_canonical()))
            .collect::<Vec<_>>();
        forwarded.into_iter().rev().find(|a| !is_trusted(a)).or(self.peer).unwrap_or(LOCAL)
    }
}

/// The client of a unix-socket request that names none.
const LOCAL: IpAddr = IpAddr::V6(Ipv6Addr::UNSPECIFIED);

/// Why a request got no slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Every slot is held by a stream that is being read.
    Full,
    /// The bound is contended, the client holds its share, and all of its streams are being read.
    ClientShare,
}

struct Held {
    client: IpAddr,
    last_read: Arc<AtomicU64>,
    close: CancellationToken,
}

#[derive(Default)]
struct Inner {
    next_id: u64,
    held: HashMap<u64, Held>,
    per_client: HashMap<IpAddr, usize>,
    /// Requests waiting for a slot whose client holds less than its share: a freed slot is
    /// theirs before it is a client's over its share.
    fair_waiters: usize,
}

impl Inner {
    fn remove(&mut self, id: u64) -> Option<Held> {
        let held = self.held.remove(&id)?;
        if let Some(n) = self.per_client.get_mut(&held.client) {
            *n -= 1;
            if *n == 0 {
                self.per_client.remove(&held.client);
            }
        }
        Some(held)
    }
}

/// One bound: `capacity` streams; while others wait for it, at most `share` of them per client.
pub struct Slots {
    capacity: usize,
    per_client: usize,
    min_idle: Duration,
    /// How long a request may wait for a slot before it is refused.
    max_wait: Duration,
    epoch: Instant,
    evictions: Counter,
    inner: Mutex<Inner>,
    /// Told each time a slot is freed.
    freed: Notify,
}

impl Slots {
    /// A bound of `capacity` slots, of which one client holds at most `share` (at least one)
    /// when others want them; a stream idle for `min_idle` may be made to give its slot up, and a
    /// request waits up to `max_wait` for a slot before it is refused. `evictions` counts
    /// streams made to give up.
    pub fn new(capacity: usize, share: f64, min_idle: Duration, max_wait: Duration, evictions: Counter) -> Arc<Self> {
        let capacity = capacity.max(1);
        let per_client = ((capacity as f64 * share).ceil() as usize).clamp(1, capacity);
        Arc::new(Self {
            capacity,
            per_client,
            min_idle,
            max_wait,
            epoch: Instant::now(),
            evictions,
            inner: Mutex::default(),
            freed: Notify::new(),
        })
    }

    /// Milliseconds on this bound's clock, which starts far from zero so that "n ms ago" is
    /// always a time on it.
    fn now(&self) -> u64 {
        const START: u64 = 1 << 40;
        START.saturating_add(u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX))
    }

    /// Streams holding a slot now.
    pub fn in_use(&self) -> usize {
        self.inner.lock().map(|i| i.held.len()).unwrap_or(0)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A slot for `client`, whose stream is closed through `close` if it must give the slot up.
    /// A free slot is taken at once, whatever the client holds, unless a client under its share
    /// waits for one. At a full bound the idlest stream past the minimum gives its slot up (the
    /// client's own when it holds its share); failing that the request waits, up to the bound's
    /// `max_wait`, for a slot to be freed.
    pub async fn acquire(self: &Arc<Self>, client: IpAddr, close: &CancellationToken) -> Result<Slot, Refused> {
        let deadline = tokio::time::Instant::now() + self.max_wait;
        let mut waiting: Option<FairWaiter<'_>> = None;
        let mut first = true;
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            // Registered before the attempt, so a slot freed right after it still wakes us.
            freed.as_mut().enable();
            let refused = match self.attempt(client, close, waiting.is_some()) {
                Ok(slot) => return Ok(slot),
                Err(refused) => refused,
            };
            if tokio::time::Instant::now() >= deadline {
                return Err(refused);
            }
            if waiting.is_none() && refused == Refused::Full {
                waiting = Some(FairWaiter::new(self));
                tracing::debug!(%client, "a request waits for a stream slot");
            } else if first {
                tracing::debug!(%client, "a request at its client's share waits for a stream slot");
            }
            first = false;
            if tokio::time::timeout_at(deadline, freed).await.is_err() {
                // Once more at the deadline: a slot may have been freed without a wake-up for us.
                return self.attempt(client, close, waiting.is_some());
            }
        }
    }

    /// One attempt under the lock; a request counted among the fair waiters (`is_fair_waiter`)
    /// is not held back by its own place there.
    fn attempt(
        self: &Arc<Self>,
        client: IpAddr,
        close: &CancellationToken,
        is_fair_waiter: bool,
    ) -> Result<Slot, Refused> {
        let mut inner = self.lock();
        let ahead = inner.fair_waiters.saturating_sub(usize::from(is_fair_waiter));
        self.try_acquire(&mut inner, client, close, ahead)
    }

    /// One attempt; `fair_ahead` counts other waiting requests of clients under their share.
    fn try_acquire(
        self: &Arc<Self>,
        inner: &mut Inner,
        client: IpAddr,
        close: &CancellationToken,
        fair_ahead: usize,
    ) -> Result<Slot, Refused> {
        let now = self.now();
        let min_idle = u64::try_from(self.min_idle.as_millis()).unwrap_or(u64::MAX);
        // The stream (of `client`, or of anyone) whose client has read nothing the longest.
        let idlest = |inner: &Inner, only: Option<IpAddr>| {
            inner
                .held
                .iter()
                .filter(|(_, h)| only.is_none_or(|c| h.client == c))
                .map(|(id, h)| (*id, now.saturating_sub(h.last_read.load(Ordering::Relaxed))))
                .filter(|(_, idle)| *idle >= min_idle)
                .max_by_key(|(_, idle)| *idle)
                .map(|(id, _)| id)
        };
        let at_share = inner.per_client.get(&client).copied().unwrap_or(0) >= self.per_client;
        // A client at its share yields free slots to those under theirs that wait.
        let free = inner.held.len() < self.capacity && !(at_share && fair_ahead > 0);
        let victim = if free {
            None
        } else if at_share {
            Some(idlest(inner, Some(client)).ok_or(Refused::ClientShare)?)
        } else {
            Some(idlest(inner, None).ok_or(Refused::Full)?)
        };
        if let Some(held) = victim.and_then(|id| inner.remove(id)) {
            held.close.cancel();
            self.evictions.inc();
        }
        let id = inner.next_id;
        inner.next_id += 1;
        let last_read = Arc::new(AtomicU64::new(now));
        inner.held.insert(id, Held { client, last_read: last_read.clone(), close: close.clone() });
        *inner.per_client.entry(client).or_default() += 1;
        Ok(Slot { slots: self.clone(), id, last_read })
    }
}

/// A request of a client under its share, counted among the fair waiters while it waits.
struct FairWaiter<'a> {
    slots: &'a Slots,
}

impl<'a> FairWaiter<'a> {
    fn new(slots: &'a Slots) -> Self {
        slots.lock().fair_waiters += 1;
        Self { slots }
    }
}

impl Drop for FairWaiter<'_> {
    fn drop(&mut self) {
        let mut inner = self.slots.lock();
        inner.fair_waiters = inner.fair_waiters.saturating_sub(1);
        drop(inner);
        // Whoever stood behind this request may take a free slot now.
        self.slots.freed.notify_waiters();
    }
}

/// A held slot; released when dropped.
pub struct Slot {
    slots: Arc<Slots>,
    id: u64,
    last_read: Arc<AtomicU64>,
}

impl Slot {
    /// The client just took a chunk.
    fn mark_read(&self) {
        self.last_read.store(self.slots.now(), Ordering::Relaxed);
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut inner = self.slots.lock();
        // An evicted stream's slot has been taken over already: nothing is freed.
        let freed = inner.remove(self.id).is_some();
        drop(inner);
        if freed {
            self.slots.freed.notify_waiters();
        }
    }
}

/// A response body holding slots, marking them read each time the connection asks for more
/// (which it does only when the client has taken what was sent).
pub struct SlotBody<B> {
    body: B,
    slots: Vec<Slot>,
}

impl<B> SlotBody<B> {
    pub fn new(body: B, slots: Vec<Slot>) -> Self {
        Self { body, slots }
    }
}

impl<B: Body + Unpin> Body for SlotBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        for slot in &self.slots {
            slot.mark_read();
        }
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn slots(capacity: usize, share: f64, min_idle_ms: u64) -> Arc<Slots> {
        Slots::new(capacity, share, Duration::from_millis(min_idle_ms), Duration::ZERO, Counter::default())
    }

    /// Makes `slot` look idle for `ms` milliseconds.
    fn age(slot: &Slot, ms: u64) {
        slot.last_read.store(slot.slots.now().saturating_sub(ms), Ordering::Relaxed);
    }

    #[tokio::test]
    async fn a_full_bound_takes_the_idlest_slot_and_closes_its_connection() {
        let s = slots(3, 1.0, 1000);
        let closes: Vec<CancellationToken> = (0..4).map(|_| CancellationToken::new()).collect();
        let a = s.acquire(ip("10.0.0.1"), &closes[0]).await.unwrap();
        let b = s.acquire(ip("10.0.0.2"), &closes[1]).await.unwrap();
        let c = s.acquire(ip("10.0.0.3"), &closes[2]).await.unwrap();
        // Nobody idle long enough: a 503.
        assert_eq!(s.acquire(ip("10.0.0.4"), &closes[3]).await.err(), Some(Refused::Full));
        age(&a, 5_000);
        age(&b, 9_000);
        age(&c, 500);
        let d = s.acquire(ip("10.0.0.4"), &closes[3]).await.unwrap();
        assert!(closes[1].is_cancelled() && !closes[0].is_cancelled() && !closes[2].is_cancelled());
        assert_eq!(s.in_use(), 3);
        assert_eq!(s.evictions.get(), 1);
        // The evicted stream's slot is gone already; dropping it frees nothing more.
        drop(b);
        assert_eq!(s.in_use(), 3);
        drop((a, c, d));
        assert_eq!(s.in_use(), 0);
    }

    #[tokio::test]
    async fn a_client_takes_the_whole_free_bound_and_at_a_full_one_only_its_own_idle_stream() {
        let s = slots(8, 0.25, 1000);
        let t = CancellationToken::new();
        let other = s.acquire(ip("10.0.0.9"), &t).await.unwrap();
        age(&other, 60_000);
        // Uncontended, one client may hold every free slot, far past its share of 2.
        let mut mine = Vec::new();
        for _ in 0..7 {
            mine.push(s.acquire(ip("10.0.0.1"), &CancellationToken::new()).await.unwrap());
        }
        assert_eq!(s.in_use(), 8);
        assert_eq!(s.acquire(ip("10.0.0.1"), &CancellationToken::new()).await.err(), Some(Refused::ClientShare));
        age(&mine[0], 2_000);
        let _more = s.acquire(ip("10.0.0.1"), &CancellationToken::new()).await.unwrap();
        assert!(!t.is_cancelled(), "another client's idle stream was taken");
        assert_eq!(s.in_use(), 8);
    }

    fn waiting(capacity: usize, share: f64, wait: Duration) -> Arc<Slots> {
        Slots::new(capacity, share, Duration::from_secs(600), wait, Counter::default())
    }

    #[tokio::test]
    async fn a_request_at_a_full_bound_waits_for_a_freed_slot() {
        let s = waiting(1, 1.0, Duration::from_secs(600));
        let a = s.acquire(ip("10.0.0.1"), &CancellationToken::new()).await.unwrap();
        let next_close = CancellationToken::new();
        let next = s.acquire(ip("10.0.0.2"), &next_close);
        tokio::pin!(next);
        assert!(futures::poll!(next.as_mut()).is_pending());
        drop(a);
        let _b = next.await.unwrap();
        assert_eq!(s.in_use(), 1);
    }

    #[tokio::test]
    async fn a_wait_is_bounded() {
        let s = waiting(1, 1.0, Duration::from_millis(50));
        let _a = s.acquire(ip("10.0.0.1"), &CancellationToken::new()).await.unwrap();
        let started = std::time::Instant::now();
        assert_eq!(s.acquire(ip("10.0.0.2"), &CancellationToken::new()).await.err(), Some(Refused::Full));
        assert!(started.elapsed() >= Duration::from_millis(50));
    }

    #[tokio::test]
    async fn a_freed_slot_goes_to_a_client_under_its_share_first() {
        let s = waiting(4, 0.25, Duration::from_secs(600));
        let mut greedy = Vec::new();
        for _ in 0..4 {
            greedy.push(s.acquire(ip("10.0.0.1"), &CancellationToken::new()).await.unwrap());
        }
        let fair_close = CancellationToken::new();
        let fair = s.acquire(ip("10.0.0.2"), &fair_close);
        tokio::pin!(fair);
        assert!(futures::poll!(fair.as_mut()).is_pending());
        let again_close = CancellationToken::new();
        let again = s.acquire(ip("10.0.0.1"), &again_close);
        tokio::pin!(again);
        assert!(futures::poll!(again.as_mut()).is_pending());
        greedy.pop();
        // The greedy client, at its share, is passed over while the other waits.
        assert!(futures::poll!(again.as_mut()).is_pending());
        let _fair = fair.await.unwrap();
        greedy.pop();
        let _again = again.await.unwrap();
        assert_eq!(s.in_use(), 4);
    }

    #[tokio::test]
    async fn marking_a_read_protects_a_stream() {
        let s = slots(1, 1.0, 1000);
        let t = CancellationToken::new();
        let a = s.acquire(ip("10.0.0.1"), &t).await.unwrap();
        age(&a, 5_000);
        a.mark_read();
        assert_eq!(s.acquire(ip("10.0.0.2"), &CancellationToken::new()).await.err(), Some(Refused::Full));
    }

    #[test]
    fn the_client_is_the_peer_or_what_a_trusted_proxy_forwarded() {
        let trusted = [ip("127.0.0.1")];
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", "203.0.113.7, 10.1.1.1".parse().unwrap());
        // An untrusted peer's header is ignored.
        assert_eq!(Conn::new(Some(ip("10.9.9.9"))).client(&h, &trusted), ip("10.9.9.9"));
        // A trusted proxy: the address it appended (the rightmost untrusted one).
        assert_eq!(Conn::new(Some(ip("127.0.0.1"))).client(&h, &trusted), ip("10.1.1.1"));
        // A unix socket is a local proxy.
        assert_eq!(Conn::new(None).client(&h, &trusted), ip("10.1.1.1"));
        assert_eq!(Conn::new(None).client(&HeaderMap::new(), &trusted), LOCAL);
        // A proxy without the header, or with garbage in it: the proxy itself.
        let mut bad = HeaderMap::new();
        bad.insert("x-forwarded-for", "not an address".parse().unwrap());
        assert_eq!(Conn::new(Some(ip("127.0.0.1"))).client(&bad, &trusted), ip("127.0.0.1"));
        // An IPv4-mapped forwarded address is the IPv4 client it names.
        let mut mapped = HeaderMap::new();
        mapped.insert("x-forwarded-for", "::ffff:10.1.1.1".parse().unwrap());
        assert_eq!(Conn::new(Some(ip("127.0.0.1"))).client(&mapped, &trusted), ip("10.1.1.1"));
    }
}
