//! Where build requests come from, behind one interface: core NATS (a queue-group subscription
//! on `build.<repo>.>`: at most once, gone if the builder dies) or a JetStream work queue (a
//! stream capturing `build.<repo>.>` of the configured repos and one durable pull consumer that
//! every builder shares: at least once, redelivered until acknowledged).
//!
//! With JetStream a builder takes a request only when it is idle, so the requests wait in the
//! stream (surviving any builder) and go to whichever builder is free. A request is acknowledged
//! only after its final reply is out; meanwhile the worker says "in progress" well inside the
//! ack wait, so a long build is never redelivered, while a dead builder's is.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind, consumer::PullConsumer};
use futures::StreamExt;

use tokio_util::sync::CancellationToken;

use super::config::{BuilderConfig, JetStreamSection, QueueKind};

/// How long one pull waits for a request: also how much longer a graceful stop of an idle
/// builder may take (its last pull is seen to its end).
const PULL_EXPIRES: Duration = Duration::from_secs(2);

/// One delivered request.
pub struct Delivery {
    pub subject: String,
    pub payload: bytes::Bytes,
    pub headers: Option<async_nats::HeaderMap>,
    /// The message's own reply subject (core NATS only: JetStream keeps none).
    pub reply: Option<String>,
    /// How to acknowledge it (JetStream only).
    pub ack: Option<Ack>,
}

/// A JetStream delivery's acknowledgement handle.
#[derive(Clone)]
pub struct Ack {
    message: Arc<jetstream::Message>,
    /// Which delivery of the request this is (1 = the first).
    pub delivered: i64,
    /// The request's sequence number in the stream.
    pub sequence: u64,
}

impl std::fmt::Debug for Ack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Ack(seq {}, delivery {})", self.sequence, self.delivered)
    }
}

impl Ack {
    /// Still working on it: the ack wait starts again.
    pub async fn working(&self) {
        if let Err(e) = self.message.ack_with(AckKind::Progress).await {
            tracing::warn!(seq = self.sequence, err = %e, "cannot tell JetStream the build goes on");
        }
    }

    /// Done: the request leaves the stream.
    pub async fn done(&self) {
        if let Err(e) = self.message.double_ack().await {
            tracing::warn!(seq = self.sequence, err = %e, "cannot acknowledge a finished request");
        }
    }

    /// Not done: delivered again at once, to whichever builder takes it. Waits for the server
    /// to confirm, so a builder that exits next has given it back for certain.
    pub async fn give_back(&self) {
        if let Err(e) = self.message.double_ack_with(AckKind::Nak(None)).await {
            tracing::warn!(seq = self.sequence, err = %e, "cannot give a request back");
        }
    }

    /// Never again: the request leaves the stream without a build.
    pub async fn term(&self) {
        if let Err(e) = self.message.double_ack_with(AckKind::Term).await {
            tracing::warn!(seq = self.sequence, err = %e, "cannot remove a request");
        }
    }
}

/// The requests' source.
pub enum Transport {
    Core(futures::stream::SelectAll<async_nats::Subscriber>),
    JetStream(Box<Durable>),
}

/// The JetStream side: set up (stream and consumer) on first use and again after an error.
pub struct Durable {
    js: jetstream::Context,
    settings: JetStreamSection,
    subjects: Vec<String>,
    consumer: Option<PullConsumer>,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TransportError(String);

/// The stream's subjects: `build.<repo>.>` for every configured repo (never `build.responses.>`).
pub fn stream_subjects(config: &BuilderConfig) -> Vec<String> {
    config.repos.iter().map(|r| format!("build.{}.>", r.name)).collect()
}

impl Transport {
    /// Subscribes (core) or prepares the durable consumer (JetStream; set up at the first
    /// `next`, so a NATS that is down at startup delays only the builds).
    pub async fn open(client: &async_nats::Client, config: &BuilderConfig) -> Self {
        match config.queue {
            QueueKind::Core => {
                let mut subs = Vec::new();
                for subject in stream_subjects(config) {
                    match client.queue_subscribe(subject.clone(), config.queue_group.clone()).await {
                        Ok(s) => subs.push(s),
                        Err(e) => tracing::error!(%subject, err = %e, "cannot subscribe"),
                    }
                }
                Transport::Core(futures::stream::select_all(subs))
            }
            QueueKind::JetStream => Transport::JetStream(Box::new(Durable {
                js: jetstream::new(client.clone()),
                settings: config.jetstream.clone(),
                subjects: stream_subjects(config),
                consumer: None,
            })),
        }
    }

    /// The next request; `None` once `stop` is cancelled. With JetStream, waits until `idle()`
    /// (the local queue has room) first, so a busy builder leaves requests in the stream for the
    /// others; a pull already asked for is seen to its end even after `stop` (the server may be
    /// handing a request to it), and what it brings is returned.
    pub(super) async fn next<F: std::future::Future<Output = ()>>(
        &mut self,
        idle: impl Fn() -> F,
        stop: &CancellationToken,
    ) -> Option<Delivery> {
        match self {
            Transport::Core(subs) => {
                let m = tokio::select! {
                    m = subs.next() => m?,
                    _ = stop.cancelled() => return None,
                };
                Some(Delivery {
                    subject: m.subject.to_string(),
                    payload: m.payload,
                    headers: m.headers,
                    reply: m.reply.map(|r| r.to_string()),
                    ack: None,
                })
            }
            Transport::JetStream(durable) => loop {
                tokio::select! {
                    biased;
                    _ = stop.cancelled() => return None,
                    () = idle() => {}
                }
                match durable.fetch().await {
                    Ok(Some(d)) => return Some(d),
                    Ok(None) if stop.is_cancelled() => return None,
                    Ok(None) => {}
                    Err(e) => {
                        tracing::warn!(err = %e, "cannot take requests from JetStream; trying again");
                        durable.consumer = None;
                        tokio::select! {
                            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                            _ = stop.cancelled() => return None,
                        }
                    }
                }
            },
        }
    }

    /// Stops taking requests (core: unsubscribes; JetStream: nothing is held).
    pub async fn close(&mut self) {
        if let Transport::Core(subs) = self {
            for sub in subs.iter_mut() {
                let _ = sub.unsubscribe().await;
            }
        }
    }

    /// How requests arrive, for the log.
    pub fn describe(&self) -> String {
        match self {
            Transport::Core(_) => "core NATS queue group".to_owned(),
            Transport::JetStream(d) => {
                format!("JetStream stream {} (consumer {})", d.settings.stream, d.settings.consumer)
            }
        }
    }
}

impl Durable {
    /// Creates or checks the stream and the consumer (idempotent: a second builder finds them).
    async fn ensure(&mut self) -> Result<&PullConsumer, TransportError> {
        if self.consumer.is_none() {
            let s = &self.settings;
            let stream = self
                .js
                .create_or_update_stream(jetstream::stream::Config {
                    name: s.stream.clone(),
                    description: Some("hearth build requests (a work queue)".into()),
                    subjects: self.subjects.clone(),
                    retention: jetstream::stream::RetentionPolicy::WorkQueue,
                    storage: jetstream::stream::StorageType::File,
                    max_age: Duration::from_secs(s.max_age_seconds),
                    max_bytes: i64::try_from(s.max_bytes).unwrap_or(i64::MAX),
                    num_replicas: s.replicas,
                    // A publisher's `Nats-Msg-Id` is kept this long: a retried publish is one request.
                    duplicate_window: Duration::from_secs(120),
                    discard: jetstream::stream::DiscardPolicy::New,
                    ..Default::default()
                })
                .await
                .map_err(|e| TransportError(format!("stream {}: {e}", s.stream)))?;
            let name = stream.config.name.clone();
            let stream = self.js.get_stream(&name).await.map_err(|e| TransportError(format!("stream {name}: {e}")))?;
            let config = jetstream::consumer::pull::Config {
                durable_name: Some(s.consumer.clone()),
                description: Some("hearth builders".into()),
                ack_policy: jetstream::consumer::AckPolicy::Explicit,
                ack_wait: Duration::from_secs(s.ack_wait_seconds),
                // No bound here: the worker counts deliveries itself, leaving out those given
                // back on a graceful stop, and answers the one past `max_deliver`.
                max_deliver: -1,
                max_ack_pending: 1000,
                ..Default::default()
            };
            // Made, or brought up to this config (an older hearth's consumer had a bound).
            let consumer: PullConsumer = match stream.create_consumer(config.clone()).await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(consumer = %s.consumer, err = %e, "cannot update the consumer's config; using it as it is (its max_deliver may count give-backs)");
                    stream
                        .get_or_create_consumer(&s.consumer, config)
                        .await
                        .map_err(|e| TransportError(format!("consumer {}: {e}", s.consumer)))?
                }
            };
            tracing::info!(stream = %s.stream, consumer = %s.consumer, "taking build requests from JetStream");
            self.consumer = Some(consumer);
        }
        self.consumer.as_ref().ok_or_else(|| TransportError("no consumer".into()))
    }

    /// One request, if one comes within [`PULL_EXPIRES`].
    async fn fetch(&mut self) -> Result<Option<Delivery>, TransportError> {
        let consumer = self.ensure().await?;
        let mut batch = consumer
            .fetch()
            .max_messages(1)
            .expires(PULL_EXPIRES)
            .messages()
            .await
            .map_err(|e| TransportError(format!("fetch: {e}")))?;
        let Some(message) = batch.next().await else { return Ok(None) };
        let message = message.map_err(|e| TransportError(format!("fetch: {e}")))?;
        let (delivered, sequence) = match message.info() {
            Ok(info) => (info.delivered, info.stream_sequence),
            Err(_) => (1, 0),
        };
        let subject = message.subject.to_string();
        let payload = message.payload.clone();
        let headers = message.headers.clone();
        Ok(Some(Delivery {
            subject,
            payload,
            headers,
            reply: None,
            ack: Some(Ack { message: Arc::new(message), delivered, sequence }),
        }))
    }
}
