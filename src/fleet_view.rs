//! `[fleet]`: a hearth without a builder (a read-through cache, say) that shows the fleet's
//! shared record all the same: it reads the record's key-value bucket and watches it, and
//! counts what waits in the build stream, with a NATS user that may only read them. It writes
//! nothing, and builds nothing.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use crate::builder::config::NatsAuth;
use crate::fleet::Fleet;
use crate::validate::ConfigError;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FleetSection {
    pub nats_url: String,
    pub nkey_seed_file: Option<PathBuf>,
    pub creds_file: Option<PathBuf>,
    /// The shared record's key-value bucket (the builders' `[builder.jetstream] bucket`).
    pub bucket: String,
    /// The build stream and its consumer (the builders' `stream` and `consumer`).
    pub stream: String,
    pub consumer: String,
}

impl Default for FleetSection {
    fn default() -> Self {
        Self {
            nats_url: "nats://127.0.0.1:4222".into(),
            nkey_seed_file: None,
            creds_file: None,
            bucket: "hearth_fleet".into(),
            stream: "HEARTH_BUILDS".into(),
            consumer: "hearth-builders".into(),
        }
    }
}

/// `[fleet]`, validated, its credentials loaded.
#[derive(Debug, Clone)]
pub struct FleetConfig {
    pub nats_url: String,
    pub auth: NatsAuth,
    pub bucket: String,
    pub stream: String,
    pub consumer: String,
}

impl FleetConfig {
    pub fn from_section(s: FleetSection) -> Result<Self, ConfigError> {
        let auth = NatsAuth::load(s.nkey_seed_file.as_deref(), s.creds_file)?;
        for (key, value) in [("fleet.bucket", &s.bucket), ("fleet.stream", &s.stream), ("fleet.consumer", &s.consumer)]
        {
            if !crate::builder::job::is_valid_name(value) {
                return Err(ConfigError::Value { key, reason: "must be a plain name".into() });
            }
        }
        Ok(Self { nats_url: s.nats_url, auth, bucket: s.bucket, stream: s.stream, consumer: s.consumer })
    }
}

/// How often what waits in the build stream is counted.
const COUNT_EVERY: Duration = Duration::from_secs(10);

/// Shows the shared record in `fleet` until the process ends: connects (retrying for ever,
/// so the cache serves while NATS is down), reads and watches the record, counts the stream.
pub async fn show(config: FleetConfig, fleet: Arc<Fleet>) {
    let options = match config.auth.options().await {
        Ok(o) => o.name("hearth-fleet-view").retry_on_initial_connect().max_reconnects(None),
        Err(e) => {
            return tracing::error!(err = %e, "cannot load the NATS credentials of [fleet]; the page shows no fleet");
        }
    };
    let client = match options.connect(&config.nats_url).await {
        Ok(c) => c,
        Err(e) => return tracing::error!(url = %config.nats_url, err = %e, "cannot connect to NATS for [fleet]"),
    };
    let js = async_nats::jetstream::new(client);
    let record = loop {
        match js.get_key_value(&config.bucket).await {
            Ok(kv) => break kv,
            Err(e) => {
                tracing::warn!(bucket = %config.bucket, err = %e, "cannot open the shared fleet record yet");
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        }
    };
    fleet.show(record).await;
    tracing::info!(bucket = %config.bucket, "showing the fleet's shared record");
    loop {
        let consumer = js.get_consumer_from_stream::<async_nats::jetstream::consumer::pull::Config, _, _>(
            &config.consumer,
            &config.stream,
        );
        let waiting = match consumer.await {
            Ok(mut c) => c.info().await.ok().map(|i| i.num_pending),
            Err(_) => None,
        };
        if let Some(waiting) = waiting {
            let mut activity = fleet.activity();
            activity.waiting_in_stream = Some(waiting);
            fleet.set_activity(activity);
        }
        tokio::time::sleep(COUNT_EVERY).await;
    }
}
