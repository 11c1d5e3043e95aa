//! A real `nats-server` for tests: generated NKey users with the fleet's permissions (account
//! DEPLOY: the builder publishes `build.responses.>` and subscribes `build.>`; the deployer the
//! reverse, and may never publish a reply), on a port the server picks itself.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

pub struct Nats {
    child: Option<Child>,
    pub port: u16,
    pub dir: tempfile::TempDir,
    pub builder_seed: PathBuf,
    pub deployer_seed: PathBuf,
    /// A user that may only read replies: it may not publish build requests.
    pub watcher_seed: PathBuf,
    /// A hearth with `[fleet]` and no builder: reads the fleet record (JetStream only).
    pub reader_seed: PathBuf,
    reader_pub: String,
    builder_pub: String,
    deployer_pub: String,
    watcher_pub: String,
    /// Extra server settings (e.g. `max_payload: 32768`).
    extra: String,
    /// JetStream on, and the builder allowed its API (docs/protocol.md's permissions).
    jetstream: bool,
    /// The builder may answer flow control (`$JS.FC.>`), as documented; off to model an
    /// operator who left it out.
    flow_control: bool,
    acks: bool,
}

fn user(nkey: &str, publish: &str, subscribe: &str) -> String {
    users(nkey, &[publish], &[subscribe])
}

fn users(nkey: &str, publish: &[&str], subscribe: &[&str]) -> String {
    users_denied(nkey, publish, &[], subscribe)
}

fn list(s: &[&str]) -> String {
    s.iter().map(|x| format!("\"{x}\"")).collect::<Vec<_>>().join(", ")
}

fn users_denied(nkey: &str, publish: &[&str], publish_deny: &[&str], subscribe: &[&str]) -> String {
    format!(
        "{{ nkey: {nkey}, permissions: {{ publish: {{ allow: [{}], deny: [{}] }}, subscribe: {{ allow: [{}] }} }} }}",
        list(publish),
        list(publish_deny),
        list(subscribe)
    )
}

/// What a deployer may publish: requests, and never a reply (only builders answer).
pub const DEPLOYER_PUBLISH: [&str; 1] = ["build.>"];
pub const DEPLOYER_PUBLISH_DENY: [&str; 1] = ["build.responses.>"];

/// What a builder with `queue = "jetstream"` may publish: its replies, the JetStream API (stream,
/// consumer and bucket management, fetching), acknowledgements of the build stream, and the
/// fleet bucket's keys; and subscribe: its inboxes (fetched requests, API answers, the bucket's
/// watch).
pub const JETSTREAM_BUILDER_PUBLISH: [&str; 25] = [
    "build.responses.>",
    "$JS.API.INFO",
    // The build stream and its consumer: made, checked, fetched from; never deleted or purged.
    "$JS.API.STREAM.CREATE.HEARTH_BUILDS",
    "$JS.API.STREAM.UPDATE.HEARTH_BUILDS",
    "$JS.API.STREAM.INFO.HEARTH_BUILDS",
    "$JS.API.CONSUMER.CREATE.HEARTH_BUILDS",
    "$JS.API.CONSUMER.CREATE.HEARTH_BUILDS.>",
    "$JS.API.CONSUMER.DURABLE.CREATE.HEARTH_BUILDS.hearth-builders",
    "$JS.API.CONSUMER.INFO.HEARTH_BUILDS.hearth-builders",
    "$JS.API.CONSUMER.MSG.NEXT.HEARTH_BUILDS.hearth-builders",
    "$JS.ACK.HEARTH_BUILDS.>",
    // The fleet record's key-value bucket: made, read, watched, written.
    "$JS.API.STREAM.CREATE.KV_hearth_fleet",
    "$JS.API.STREAM.UPDATE.KV_hearth_fleet",
    "$JS.API.STREAM.INFO.KV_hearth_fleet",
    "$JS.API.STREAM.MSG.GET.KV_hearth_fleet",
    "$JS.API.DIRECT.GET.KV_hearth_fleet",
    "$JS.API.DIRECT.GET.KV_hearth_fleet.>",
    "$JS.API.CONSUMER.CREATE.KV_hearth_fleet",
    "$JS.API.CONSUMER.CREATE.KV_hearth_fleet.>",
    "$JS.API.CONSUMER.DELETE.KV_hearth_fleet.>",
    "$JS.API.CONSUMER.INFO.KV_hearth_fleet.>",
    "$JS.API.CONSUMER.MSG.NEXT.KV_hearth_fleet.>",
    "$KV.hearth_fleet.>",
    "$JS.FC.>",
    "$JS.API.CONSUMER.DURABLE.CREATE.KV_hearth_fleet.>",
];
pub const JETSTREAM_BUILDER_SUBSCRIBE: [&str; 2] = ["build.>", "_INBOX.>"];

/// What a hearth with `[fleet]` (no builder) may publish: reads and watches of the fleet record,
/// and the build consumer's state; never a write. It subscribes to its inboxes only.
pub const JETSTREAM_READER_PUBLISH: [&str; 11] = [
    "$JS.API.INFO",
    "$JS.API.STREAM.INFO.KV_hearth_fleet",
    "$JS.API.STREAM.MSG.GET.KV_hearth_fleet",
    "$JS.API.DIRECT.GET.KV_hearth_fleet",
    "$JS.API.DIRECT.GET.KV_hearth_fleet.>",
    "$JS.API.CONSUMER.CREATE.KV_hearth_fleet",
    "$JS.API.CONSUMER.CREATE.KV_hearth_fleet.>",
    "$JS.API.CONSUMER.DELETE.KV_hearth_fleet.>",
    "$JS.API.CONSUMER.INFO.KV_hearth_fleet.>",
    "$JS.FC.>",
    "$JS.API.CONSUMER.INFO.HEARTH_BUILDS.hearth-builders",
];
pub const JETSTREAM_READER_SUBSCRIBE: [&str; 1] = ["_INBOX.>"];

impl Nats {
    pub fn start() -> Self {
        Self::start_with("")
    }

    /// Starts a server with JetStream (its store in the test's directory, kept over restarts).
    pub fn start_jetstream() -> Self {
        Self::start_inner("", true)
    }

    /// The same, but the builder's user lacks `$JS.FC.>`: its record watch stalls.
    #[allow(dead_code)] // Not every test crate uses it.
    pub fn start_jetstream_without_flow_control() -> Self {
        let mut n = Self::start_inner("", true);
        n.flow_control = false;
        n.restart(true);
        n
    }

    /// The same, but the builder's user may not acknowledge requests: each is delivered again
    /// after the ack wait, as when a builder dies between its final reply and its ack.
    #[allow(dead_code)] // Not every test crate uses it.
    pub fn start_jetstream_without_acks() -> Self {
        let mut n = Self::start_inner("", true);
        n.acks = false;
        n.restart(true);
        n
    }

    /// Starts a server with `extra` lines in its config.
    pub fn start_with(extra: &str) -> Self {
        Self::start_inner(extra, false)
    }

    fn start_inner(extra: &str, jetstream: bool) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let builder = nkeys::KeyPair::new_user();
        let deployer = nkeys::KeyPair::new_user();
        let watcher = nkeys::KeyPair::new_user();
        let reader = nkeys::KeyPair::new_user();
        let reader_seed = dir.path().join("reader.seed");
        std::fs::write(&reader_seed, reader.seed().expect("seed")).expect("write seed");
        let watcher_seed = dir.path().join("watcher.seed");
        std::fs::write(&watcher_seed, watcher.seed().expect("seed")).expect("write seed");
        let builder_seed = dir.path().join("builder.seed");
        let deployer_seed = dir.path().join("deployer.seed");
        std::fs::write(&builder_seed, builder.seed().expect("seed")).expect("write seed");
        std::fs::write(&deployer_seed, deployer.seed().expect("seed")).expect("write seed");
        let mut n = Self {
            child: None,
            port: 0,
            dir,
            builder_seed,
            deployer_seed,
            watcher_seed,
            reader_seed,
            reader_pub: reader.public_key(),
            builder_pub: builder.public_key(),
            deployer_pub: deployer.public_key(),
            watcher_pub: watcher.public_key(),
            extra: extra.to_owned(),
            jetstream,
            flow_control: true,
            acks: true,
        };
        n.write_config(true);
        n.spawn();
        n
    }

    fn config_path(&self) -> PathBuf {
        self.dir.path().join("nats.conf")
    }

    /// Writes the server config; without `with_builder` the builder's user cannot log in.
    pub fn write_config(&self, with_builder: bool) {
        let mut users = vec![
            users_denied(&self.deployer_pub, &DEPLOYER_PUBLISH, &DEPLOYER_PUBLISH_DENY, &["build.responses.>"]),
            user(&self.watcher_pub, "watch.nothing", "build.responses.>"),
        ];
        if with_builder && self.jetstream {
            let publish: Vec<&str> = JETSTREAM_BUILDER_PUBLISH
                .iter()
                .copied()
                .filter(|p| self.flow_control || *p != "$JS.FC.>")
                .filter(|p| self.acks || !p.starts_with("$JS.ACK."))
                .collect();
            users.push(super::nats::users(&self.builder_pub, &publish, &JETSTREAM_BUILDER_SUBSCRIBE));
            users.push(super::nats::users(&self.reader_pub, &JETSTREAM_READER_PUBLISH, &JETSTREAM_READER_SUBSCRIBE));
        } else if with_builder {
            users.push(user(&self.builder_pub, "build.responses.>", "build.>"));
        }
        let port = if self.port == 0 { "-1".to_owned() } else { self.port.to_string() };
        let (server_js, account_js) = if self.jetstream {
            (
                format!("jetstream {{ store_dir: \"{}\" }}\n", self.dir.path().join("js").display()),
                "    jetstream: enabled\n",
            )
        } else {
            (String::new(), "")
        };
        let conf = format!(
            "host: 127.0.0.1\nport: {port}\npid_file: \"{}\"\n{}\n{server_js}accounts: {{\n  DEPLOY: {{\n{account_js}    users: [\n      {}\n    ]\n  }}\n}}\n",
            self.dir.path().join("nats.pid").display(),
            self.extra,
            users.join(",\n      ")
        );
        std::fs::write(self.config_path(), conf).expect("write nats config");
    }

    fn spawn(&mut self) {
        let mut child = Command::new("nats-server")
            .arg("-c")
            .arg(self.config_path())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("nats-server not found: scripts/test installs Debian's nats-server");
        let mut reader = BufReader::new(child.stderr.take().expect("stderr"));
        let mut line = String::new();
        let mut seen = String::new();
        while reader.read_line(&mut line).unwrap_or(0) > 0 {
            seen.push_str(&line);
            if let Some(rest) = line.split("Listening for client connections on ").nth(1) {
                self.port = rest.trim().rsplit(':').next().and_then(|p| p.parse().ok()).expect("port");
                break;
            }
            line.clear();
        }
        assert!(self.port != 0, "nats-server did not start:\n{seen}");
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut reader, &mut std::io::sink());
        });
        self.child = Some(child);
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Kills the server (SIGKILL) and waits for it to exit.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port.
    pub fn restart(&mut self, with_builder: bool) {
        self.kill();
        self.write_config(with_builder);
        self.spawn();
    }

    /// Rewrites the config and makes the running server reload it.
    pub fn reload(&self, with_builder: bool) {
        self.write_config(with_builder);
        let pid = self.child.as_ref().expect("running").id();
        let ok = Command::new("kill").args(["-HUP", &pid.to_string()]).status().expect("kill").success();
        assert!(ok, "cannot signal nats-server");
    }

    /// An async client logged in as the deployer.
    pub async fn deployer(&self) -> async_nats::Client {
        self.client(&self.deployer_seed, async_nats::ConnectOptions::new()).await
    }

    /// An async client logged in with the seed in `seed`, with `options`.
    pub async fn client(&self, seed: &Path, options: async_nats::ConnectOptions) -> async_nats::Client {
        let seed = std::fs::read_to_string(seed).expect("seed");
        options.nkey(seed.trim().to_owned()).connect(self.url()).await.expect("client connects")
    }

    pub fn seed_path(&self) -> &Path {
        &self.deployer_seed
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.kill();
    }
}
