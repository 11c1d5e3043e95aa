//! Durable build requests and several builders as one: hearths with `queue = "jetstream"` on a
//! real nats-server with JetStream (started here, with the permissions docs/protocol.md lists),
//! the real Nix, and the real `hearth build`; and, in `core` mode, a client that notices a
//! builder that went silent.
//!
//! Hosts wait for a file the test creates (the gate), so the test decides when a build ends.

#![allow(clippy::unwrap_used)] // Test code: a panic is a failed test.

mod common;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::builder::BuilderToml;
use common::flake::{flake, make_repo, salt};
use common::nats::Nats;
use common::{Hearth, wait_until};
use futures::StreamExt;
use serde_json::Value;

/// A flake repo of gated hosts, and the gate.
struct Repo {
    dir: tempfile::TempDir,
    gate: PathBuf,
    hosts: Vec<String>,
}

impl Repo {
    fn new(hosts: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let gate = dir.path().join("gate");
        std::fs::create_dir_all(&gate).unwrap();
        common::set_mode(&gate, 0o777);
        let repo = Repo { dir, gate, hosts: hosts.iter().map(|h| h.to_string()).collect() };
        make_repo(&repo.dir.path().join("fleet"), &repo.flake());
        repo
    }

    /// The flake: every host's system waits for the gate, and is new to every store.
    fn flake(&self) -> String {
        let (salt, g) = (salt(), self.gate.display());
        let hosts: Vec<(&str, String)> = self
            .hosts
            .iter()
            .map(|h| {
                (h.as_str(), format!("while [ ! -e {g}/release ]; do /bin/sleep 0.05; done; echo {h} {salt} > $out"))
            })
            .collect();
        flake(&hosts)
    }

    /// A new commit whose systems are new again, behind a closed gate.
    fn next_commit(&self) {
        let _ = std::fs::remove_file(self.gate.join("release"));
        let dir = self.dir.path().join("fleet");
        std::fs::write(dir.join("flake.nix"), self.flake()).unwrap();
        common::flake::git(&dir, &["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-am", "next"]);
    }

    fn url(&self) -> String {
        format!("git+file://{}", self.dir.path().join("fleet").display())
    }

    fn release(&self) {
        std::fs::write(self.gate.join("release"), "").unwrap();
    }
}

/// A hearth whose builder takes requests from `queue` ("jetstream" or "core") as `name`.
fn builder(nats: &Nats, repo: &Repo, queue: &str, name: &str, extra: &str) -> Hearth {
    builder_with(nats, repo, queue, name, extra, "")
}

/// The same, with `jetstream` lines in `[builder.jetstream]`.
fn builder_with(nats: &Nats, repo: &Repo, queue: &str, name: &str, extra: &str, jetstream: &str) -> Hearth {
    builder_toml(nats, repo, queue, name, extra, jetstream).start()
}

/// The configuration of [`builder_with`].
fn builder_toml(nats: &Nats, repo: &Repo, queue: &str, name: &str, extra: &str, jetstream: &str) -> BuilderToml {
    BuilderToml::new(nats, &repo.dir.path().join(format!("gcroots-{name}")))
        .top("shutdown_grace_seconds = 1")
        .with(&format!("progress_interval_ms = 50\nqueue = \"{queue}\"\nname = \"{name}\"\n{extra}"))
        .section(&format!("[builder.jetstream]\nack_wait_seconds = 3\n{jetstream}"))
        .repo("fleet", &repo.url())
}

/// Publishes a build request for `host` as a deployer, with replies to `build.responses.<id>`.
async fn request(client: &async_nats::Client, host: &str, id: &str) -> async_nats::Subscriber {
    request_with(client, host, id, "").await
}

/// The same, with `fields` (`,"rev":"…"`, say) added to the request.
async fn request_with(client: &async_nats::Client, host: &str, id: &str, fields: &str) -> async_nats::Subscriber {
    let reply_to = format!("build.responses.{id}");
    let sub = client.subscribe(reply_to.clone()).await.unwrap();
    let body = format!(r#"{{"repo":"fleet","target":"{host}","reply_to":"{reply_to}"{fields}}}"#);
    // With a reply subject the stream answers with the request's place in it.
    client.publish_with_reply(format!("build.fleet.{host}"), reply_to, body.into()).await.unwrap();
    client.flush().await.unwrap();
    sub
}

/// Every reply on `sub` until the final one (the stream's own answer left out).
async fn until_final(sub: &mut async_nats::Subscriber) -> Vec<Value> {
    let mut replies = Vec::new();
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(120), sub.next()).await.expect("a reply").unwrap();
        let v: Value = serde_json::from_slice(&msg.payload).unwrap();
        if v.get("stream").is_some() {
            continue;
        }
        let done = matches!(v["status"].as_str(), Some("completed" | "failed" | "rejected" | "interrupted"));
        replies.push(v);
        if done {
            return replies;
        }
    }
}

/// A NATS client with the builder's key.
async fn builder_client(nats: &Nats) -> async_nats::Client {
    let seed = std::fs::read_to_string(&nats.builder_seed).unwrap();
    async_nats::ConnectOptions::with_nkey(seed.trim().to_owned()).connect(nats.url()).await.unwrap()
}

/// The shared fleet record's key-value bucket, as a builder sees it.
async fn fleet_record(nats: &Nats) -> async_nats::jetstream::kv::Store {
    async_nats::jetstream::new(builder_client(nats).await).get_key_value("hearth_fleet").await.unwrap()
}

/// Waits until the stream holds no request, delivered or not: nothing more will be built.
async fn until_queue_empty(nats: &Nats) {
    let js = async_nats::jetstream::new(builder_client(nats).await);
    common::wait_until_async("the stream to hold no request", Duration::from_secs(60), || async {
        let mut stream = js.get_stream("HEARTH_BUILDS").await.unwrap();
        stream.info().await.unwrap().state.messages == 0
    })
    .await;
}

/// #31.6 many times: a builder stopped gracefully at each moment of a request's life (as it
/// starts taking requests, while it plans, while it builds), nine times over one request with
/// `max_deliver = 1`: every stop gives the request back and none uses a delivery up, so the
/// builder after them builds it, once, at the delivery those give-backs add up to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_stops_at_any_moment_neither_use_up_nor_lose_a_request() {
    let nats = Nats::start_jetstream();
    let repo = Repo::new(&["g1"]);
    let client = nats.deployer().await;
    let start = || builder_with(&nats, &repo, "jetstream", "builder-a", "", "max_deliver = 1");
    let mut h = start();
    let mut sub = request(&client, "g1", "stops").await;
    let gave_back = |h: &Hearth| h.log().matches("the request goes back to the JetStream queue").count();
    let mut given_back = 0;
    for round in 0..9 {
        if round > 0 {
            h = start();
        }
        let moment = ["builder listening", "build started", "claimed the build"][round % 3];
        h.wait_for_log(moment, 1);
        assert!(h.terminate().success(), "round {round}:\n{}", h.log());
        given_back += gave_back(&h);
    }
    eprintln!("nine graceful stops gave the request back {given_back} times");
    h = start();
    until_started(&h, &nats, 1).await;
    repo.release();
    let replies = until_final(&mut sub).await;
    assert_eq!(replies.last().unwrap()["status"], "completed", "{replies:?}");
    assert!(h.log().contains(&format!("delivery={}", given_back + 1)), "{given_back} give-backs:\n{}", h.log());
    assert_eq!(h.log().matches("host built").count(), 1, "{}", h.log());
    until_queue_empty(&nats).await;
}

/// Waits (up to 60 s) until `h` has started `count` builds; if it has not, fails with what
/// the stream and its consumer hold, which tells a request the server kept back from one lost.
async fn until_started(h: &Hearth, nats: &Nats, count: usize) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while started(h) < count {
        if std::time::Instant::now() > deadline {
            let js = async_nats::jetstream::new(builder_client(nats).await);
            let mut stream = js.get_stream("HEARTH_BUILDS").await.unwrap();
            let stream_state = stream.info().await.map(|i| format!("{:?}", i.state));
            let consumer =
                stream.get_consumer::<async_nats::jetstream::consumer::pull::Config>("hearth-builders").await;
            let consumer_state = match consumer {
                Ok(mut c) => c.info().await.map(|i| format!("{i:?}")).unwrap_or_else(|e| e.to_string()),
                Err(e) => e.to_string(),
            };
            panic!(
                "no build started {count} times\nstream: {stream_state:?}\nconsumer: {consumer_state}\nlog:\n{}",
                h.log()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn started(h: &Hearth) -> usize {
    h.log().matches("build started").count()
}

fn hosts_on(h: &Hearth) -> Vec<String> {
    let fleet: Value = serde_json::from_slice(&h.get("/fleet.json").body).unwrap();
    let mut hosts: Vec<String> =
        fleet["hosts"].as_array().unwrap().iter().map(|h| h["host"].as_str().unwrap().to_owned()).collect();
    hosts.sort();
    hosts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_builders_share_the_queue_and_the_record_and_build_each_request_once() {
    let nats = Nats::start_jetstream();
    let repo = Repo::new(&["g1", "g2", "g3", "g4"]);
    let a = builder(&nats, &repo, "jetstream", "builder-a", "");
    let b = builder(&nats, &repo, "jetstream", "builder-b", "");
    let client = nats.deployer().await;
    let mut subs = Vec::new();
    for (i, host) in ["g1", "g2", "g3", "g4"].iter().enumerate() {
        subs.push(request(&client, host, &format!("share{i}")).await);
    }
    // Each builder takes one request while the others wait in the stream.
    wait_until("both builders build", Duration::from_secs(60), || started(&a) == 1 && started(&b) == 1);
    repo.release();
    for sub in &mut subs {
        let replies = until_final(sub).await;
        assert_eq!(replies.last().unwrap()["status"], "completed", "{replies:?}");
    }
    until_queue_empty(&nats).await;
    assert_eq!(started(&a) + started(&b), 4, "a request was built twice:\n{}\n{}", a.log(), b.log());
    assert!(started(&a) >= 1 && started(&b) >= 1);

    // One record: each hearth shows every host, whoever built it, and says who did.
    let all = vec!["g1".to_owned(), "g2".into(), "g3".into(), "g4".into()];
    wait_until("the record is shared", Duration::from_secs(30), || hosts_on(&a) == all && hosts_on(&b) == all);
    let fleet: Value = serde_json::from_slice(&b.get("/fleet.json").body).unwrap();
    let builders: Vec<&str> = fleet["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["generations"][0]["builder"].as_str().unwrap_or("none"))
        .collect();
    assert!(builders.contains(&"builder-a") && builders.contains(&"builder-b"), "{builders:?}");
    let page = b.get("/").text();
    assert!(page.contains("by builder-a") && page.contains("by builder-b"), "{page}");
    // The gauges of a host built elsewhere follow the shared record here too.
    let gauges_of_all = |h: &Hearth| {
        let m = h.get("/metrics").text();
        all.iter()
            .all(|host| m.contains(&format!("hearth_host_last_build_success{{repo=\"fleet\",host=\"{host}\"}} 1")))
    };
    wait_until("the gauges follow the shared record", Duration::from_secs(30), || {
        gauges_of_all(&a) && gauges_of_all(&b)
    });

    // A builder that starts again reads the shared record before it writes its own roots into
    // it: the hosts the other built keep their record.
    let built_by = |h: &Hearth| -> Vec<String> {
        let fleet: Value = serde_json::from_slice(&h.get("/fleet.json").body).unwrap();
        let mut v: Vec<String> = fleet["hosts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| {
                let builder = h["generations"][0]["builder"].as_str().unwrap_or("-");
                format!("{}={builder} {}", h["host"].as_str().unwrap(), h["last_build"]["status"])
            })
            .collect();
        v.sort();
        v
    };
    let before = built_by(&a);
    let mut b = b;
    b.terminate();
    let b = builder(&nats, &repo, "jetstream", "builder-b", "");
    b.wait_for_log("the fleet record is shared", 1);
    wait_until("the record survives a restart", Duration::from_secs(30), || built_by(&b) == before);
    assert_eq!(built_by(&a), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_builders_request_is_built_by_the_other_and_answered_once() {
    let nats = Nats::start_jetstream();
    let repo = Repo::new(&["g1"]);
    let mut a = builder(&nats, &repo, "jetstream", "builder-a", "");
    let mut b = builder(&nats, &repo, "jetstream", "builder-b", "");
    // The real client, waiting for its final reply.
    let cli = Command::new(env!("CARGO_BIN_EXE_hearth"))
        .args(["build", "fleet", "g1", "--json", "--nats-url", &nats.url(), "--nkey-seed-file"])
        .arg(nats.seed_path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_until("a builder takes it", Duration::from_secs(60), || started(&a) + started(&b) == 1);
    let (dead, alive) = if started(&a) == 1 { (&mut a, &mut b) } else { (&mut b, &mut a) };
    dead.child.kill().unwrap();
    dead.child.wait().unwrap();
    // Redelivered after the ack wait to the other builder, which builds it.
    alive.wait_for_log("build started", 1);
    alive.wait_for_log("delivery=2", 1);
    repo.release();
    let out = cli.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let finals: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|r| matches!(r["status"].as_str(), Some("completed" | "failed" | "interrupted" | "rejected")))
        .collect();
    assert_eq!(finals.len(), 1, "{stdout}");
    assert_eq!(finals[0]["status"], "completed");
    // The client heard which builder took it over, and on which delivery.
    let took_over = stdout
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .find(|r| r["message"].as_str().is_some_and(|m| m.contains("took over")))
        .unwrap_or_else(|| panic!("no take-over said: {stdout}"));
    assert!(took_over["message"].as_str().unwrap().contains("(delivery 2"), "{took_over}");
    until_queue_empty(&nats).await;
    assert_eq!(started(alive), 1, "built twice after its final reply:\n{}", alive.log());
    // One generation, numbered once.
    let g1 = host_entry(&fleet_record(&nats).await, "g1").await;
    let numbers: Vec<u64> =
        g1["generations"].as_array().unwrap().iter().map(|g| g["number"].as_u64().unwrap()).collect();
    assert_eq!(numbers, [1], "{g1:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_wait_in_the_stream_for_a_builder_and_none_is_lost_or_doubled_over_a_restart() {
    let nats = Nats::start_jetstream();
    let repo = Repo::new(&["g1", "g2", "g3"]);
    // The stream is made by the first builder; then no builder runs.
    let mut a = builder(&nats, &repo, "jetstream", "builder-a", "");
    a.wait_for_log("taking build requests from JetStream", 1);
    a.terminate();
    let client = nats.deployer().await;
    let mut subs = Vec::new();
    for (i, host) in ["g1", "g2", "g3"].iter().enumerate() {
        subs.push(request(&client, host, &format!("wait{i}")).await);
    }
    // A builder starts: it builds the first; the others wait in the stream. It stops mid-build
    // (its running request goes back to the stream), and starts again.
    let mut a = builder(&nats, &repo, "jetstream", "builder-a", "");
    a.wait_for_log("build started", 1);
    a.terminate();
    assert!(a.log().contains("the request goes back to the JetStream queue"), "{}", a.log());
    let a = builder(&nats, &repo, "jetstream", "builder-a", "");
    repo.release();
    for sub in &mut subs {
        let replies = until_final(sub).await;
        let last = replies.last().unwrap();
        assert_eq!(last["status"], "completed", "{replies:?}");
        let finals = replies.iter().filter(|r| r["status"] != "progress" && r["status"] != "started").count();
        assert_eq!(finals, 1, "{replies:?}");
    }
    until_queue_empty(&nats).await;
    assert_eq!(started(&a), 3, "{}", a.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_delivered_more_than_max_deliver_times_is_answered_failed_and_removed() {
    let nats = Nats::start_jetstream();
    let repo = Repo::new(&["g1"]);
    let mut a = builder_with(&nats, &repo, "jetstream", "builder-a", "", "max_deliver = 1");
    let client = nats.deployer().await;
    let mut sub = request(&client, "g1", "often").await;
    a.wait_for_log("build started", 1);
    a.child.kill().unwrap();
    a.child.wait().unwrap();
    // Its one delivery is used up: the next builder answers instead of building.
    let b = builder_with(&nats, &repo, "jetstream", "builder-b", "", "max_deliver = 1");
    let replies = until_final(&mut sub).await;
    let last = replies.last().unwrap();
    assert_eq!(last["status"], "failed", "{replies:?}");
    assert!(last["message"].as_str().unwrap().contains("delivered 1 times without a result"), "{last}");
    until_queue_empty(&nats).await;
    assert_eq!(started(&b), 0, "{}", b.log());
}

#[test]
fn in_core_mode_a_builder_that_dies_is_noticed_within_the_silence_timeout() {
    let nats = Nats::start();
    let repo = Repo::new(&["g1"]);
    let mut h = builder(&nats, &repo, "core", "builder-a", "heartbeat_seconds = 1");
    let mut cli = Command::new(env!("CARGO_BIN_EXE_hearth"))
        .args(["build", "fleet", "g1", "--json", "--silence-timeout", "4s", "--nats-url", &nats.url()])
        .arg("--nkey-seed-file")
        .arg(nats.seed_path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    h.wait_for_log("build started", 1);
    // While the builder lives, its heartbeats keep the client waiting past its silence timeout.
    let stdout = cli.stdout.take().unwrap();
    let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let reader = {
        let lines = lines.clone();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
                lines.lock().unwrap().push(line);
            }
        })
    };
    let heartbeats = || lines.lock().unwrap().iter().filter(|l| l.contains("still building")).count();
    wait_until("heartbeats for longer than the silence timeout", Duration::from_secs(30), || heartbeats() >= 6);
    assert!(cli.try_wait().unwrap().is_none(), "the client gave up on a live builder");
    h.child.kill().unwrap();
    h.child.wait().unwrap();
    let status = cli.wait().unwrap();
    reader.join().unwrap();
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut cli.stderr.take().unwrap(), &mut stderr).unwrap();
    assert_eq!(status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("the builder went silent: no reply for 4s"), "{stderr}");
}

/// Only builders answer: a deployer's key (the scheduler's, CI's) publishing a "completed" reply
/// to a waiting client is refused by the server, in both modes' documented permissions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deployer_cannot_forge_a_builders_reply() {
    for nats in [Nats::start(), Nats::start_jetstream()] {
        let subject = "build.responses.forged-test";
        let builder = nats.client(&nats.builder_seed, async_nats::ConnectOptions::new()).await;
        // A client waiting for its reply (the deployer subscribes to replies).
        let waiting = nats.deployer().await;
        let mut replies = waiting.subscribe(subject).await.unwrap();
        waiting.flush().await.unwrap();
        // The forger: a deployer whose server errors reach the test.
        let (errors_tx, mut errors) = tokio::sync::mpsc::unbounded_channel();
        let forger = nats
            .client(
                &nats.deployer_seed,
                async_nats::ConnectOptions::new().event_callback(move |event| {
                    let errors_tx = errors_tx.clone();
                    async move {
                        if let async_nats::Event::ServerError(e) = event {
                            let _ = errors_tx.send(e.to_string());
                        }
                    }
                }),
            )
            .await;
        let forged = serde_json::json!({"version": 1, "status": "completed", "message": "forged"});
        forger.publish(subject, forged.to_string().into()).await.unwrap();
        forger.flush().await.unwrap();
        let refused = tokio::time::timeout(Duration::from_secs(30), errors.recv()).await.unwrap().unwrap();
        assert!(refused.to_lowercase().contains("permissions violation"), "{refused}");
        // The server refused it before a builder's own reply was sent: the first reply the
        // client sees is the builder's.
        builder.publish(subject, "from the builder".into()).await.unwrap();
        builder.flush().await.unwrap();
        let first = tokio::time::timeout(Duration::from_secs(30), replies.next()).await.unwrap().unwrap();
        assert_eq!(&first.payload[..], b"from the builder");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bucket_gc_refuses_a_shared_record_it_cannot_read_whole() {
    let nats = Nats::start_jetstream();
    let repo = Repo::new(&["web1"]);
    // The builder makes the record's key-value bucket.
    let _a = builder(&nats, &repo, "jetstream", "a", "");
    let kv = fleet_record(&nats).await;
    kv.put("fleet/ghost", "not a host record".into()).await.unwrap();

    // The bucket is never reached: the record is read first, and only in part.
    let dir = tempfile::tempdir().unwrap();
    for f in ["id", "secret"] {
        std::fs::write(dir.path().join(f), "x").unwrap();
    }
    let config = dir.path().join("gc.toml");
    std::fs::write(
        &config,
        format!(
            r#"
sign_key_paths = ["{key}"]
[bucket]
url = "s3://nothing?endpoint=http://127.0.0.1:9&region=garage"
access_key_id_file = "{d}/id"
secret_access_key_file = "{d}/secret"

[builder]
nats_url = "{url}"
nkey_seed_file = "{seed}"
gcroots_dir = "{d}/roots"
queue = "jetstream"

[[builder.repos]]
name = "fleet"
url = "{repo}"
"#,
            d = dir.path().display(),
            key = common::nix_wire().join("keys/test.sec").display(),
            url = nats.url(),
            seed = nats.builder_seed.display(),
            repo = repo.url(),
        ),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_hearth"))
        .args(["bucket", "gc", "--grace", "0s", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "gc ran on a record it could not read whole: {stderr}");
    assert!(stderr.contains("refusing to collect") && stderr.contains("fleet/ghost"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_record_watch_is_noticed_and_started_again() {
    // The builder's user lacks `$JS.FC.>`: its watch of the record cannot answer flow control.
    let nats = Nats::start_jetstream_without_flow_control();
    let repo = Repo::new(&["web1"]);
    let a = builder(&nats, &repo, "jetstream", "a", "");
    let kv = fleet_record(&nats).await;
    let record = |host: &str, at: usize, pad: &str| {
        serde_json::json!({"repo": "fleet", "host": host, "generations": [],
            "last_build": {"status": "success", "at": at, "commit": null, "error": pad}})
        .to_string()
    };
    // About 4 MB of updates by "another builder": past what a watch gets without flow control.
    let pad = "x".repeat(40_000);
    for i in 0..100 {
        let host = format!("h{:02}", i % 10);
        kv.put(format!("fleet/{host}"), record(&host, i, &pad).into()).await.unwrap();
    }
    kv.put("fleet/zz-last", record("zz-last", 1, "").into()).await.unwrap();
    // The stall is noticed, the watch started again, and the record catches up.
    common::wait_until_async("the record to catch up", Duration::from_secs(120), || async {
        hosts_on(&a).contains(&"zz-last".to_owned())
    })
    .await;
    assert!(a.metric("hearth_fleet_record_watch_restarts_total") >= 1.0, "it caught up without a restart");
    a.wait_for_log("the shared fleet record's watch stalled", 1);
}

/// Invariant (ARCHITECTURE.md, `src/fleet.rs`): a write to the shared record is never lost,
/// whatever the interleaving of builders writing one host at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn builders_writing_one_host_at_once_lose_no_update() {
    const ROUNDS: usize = 60;
    let nats = Nats::start_jetstream();
    let mut fleets = Vec::new();
    for _ in 0..2 {
        let kv = hearth::fleet::open_shared(&builder_client(&nats).await, "hearth_fleet", 1).await.unwrap();
        let fleet = std::sync::Arc::new(hearth::fleet::Fleet::load(None));
        fleet.share(kv).await;
        fleets.push(fleet);
    }
    // Each round, both builders add a generation of their own to the same host at once.
    for round in 0..ROUNDS {
        for (i, fleet) in fleets.iter().enumerate() {
            fleet.update("fleet", "web1", move |h| {
                h.generations.push(hearth::fleet::Generation {
                    number: round as u64,
                    path: format!("/nix/store/{i}-{round}"),
                    built_at: 0,
                    commit: None,
                    builder: Some(format!("b{i}")),
                })
            });
        }
    }
    let kv = fleet_record(&nats).await;
    let written = || async {
        let Some(value) = kv.get("fleet/web1").await.unwrap() else { return 0 };
        let saved: Value = serde_json::from_slice(&value).unwrap();
        saved["generations"].as_array().map_or(0, Vec::len)
    };
    common::wait_until_async("every write in the shared record", Duration::from_secs(60), || async {
        written().await == 2 * ROUNDS
    })
    .await;
    // And both builders see it all.
    for fleet in &fleets {
        let fleet = fleet.clone();
        common::wait_until_async("each builder to see every write", Duration::from_secs(60), || {
            let fleet = fleet.clone();
            async move { fleet.snapshot().values().next().map_or(0, |h| h.generations.len()) == 2 * ROUNDS }
        })
        .await;
    }
}

/// Invariant (ARCHITECTURE.md): a request delivered again after its build ended (its builder
/// died, or lost NATS, between the final reply and the acknowledgement) is answered from the
/// record, never built again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_delivered_again_after_its_build_is_answered_from_the_record() {
    // The builder's acknowledgements are refused: every request comes back after the ack wait.
    let nats = Nats::start_jetstream_without_acks();
    let repo = Repo::new(&["g1"]);
    repo.release();
    let h = builder(&nats, &repo, "jetstream", "builder-a", "");
    let client = nats.deployer().await;
    let mut sub = request(&client, "g1", "again").await;
    let first = until_final(&mut sub).await;
    let first = first.last().unwrap();
    assert_eq!(first["status"], "completed", "{first}");
    // Delivered again: answered, with the same result, and nothing built.
    let again = until_final(&mut sub).await;
    let again = again.last().unwrap();
    assert_eq!(again["status"], "completed", "{again}");
    assert!(again["message"].as_str().unwrap().contains("from the record"), "{again}");
    assert_eq!(again["hosts"][0]["out_path"], first["hosts"][0]["out_path"]);
    assert_eq!(again["commit"], first["commit"]);
    assert_eq!(h.metric("homelab_deploy_builds_total{repo=\"fleet\",status=\"success\"}"), 1.0);
    h.wait_for_log("answered from the record, not built again", 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_waits_in_the_stream_is_counted_and_shown() {
    let nats = Nats::start_jetstream();
    let repo = Repo::new(&["g1", "g2", "g3"]);
    let h = builder(&nats, &repo, "jetstream", "builder-a", "");
    let client = nats.deployer().await;
    // One request builds (held at the gate); the builder takes no other while it does.
    let mut first = request(&client, "g1", "busy").await;
    let started = tokio::time::timeout(Duration::from_secs(60), first.next()).await.unwrap();
    assert!(started.is_some());
    let _g2 = request(&client, "g2", "w2").await;
    let _g3 = request(&client, "g3", "w3").await;
    common::wait_until_async("two requests counted as waiting", Duration::from_secs(60), || async {
        h.metric("hearth_build_queue_length") >= 2.0
    })
    .await;
    let fleet: Value = serde_json::from_slice(&h.get("/fleet.json").body).unwrap();
    assert!(fleet["activity"]["waiting_in_stream"].as_u64() >= Some(2), "{}", fleet["activity"]);
    assert!(h.get("/").text().contains("waiting in the JetStream queue"));
    // The real client, third in the stream, hears its place (and it moves up) until it is taken,
    // then which builder took it.
    let mut cli = Command::new(env!("CARGO_BIN_EXE_hearth"))
        .args(["build", "fleet", "g1", "--branch", "master", "--json", "--nats-url", &nats.url(), "--nkey-seed-file"])
        .arg(nats.seed_path())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(cli.stdout.take().unwrap()));
    let mut stdout = String::new();
    // Its place is said while it waits; the gate opens only then.
    for line in lines.by_ref() {
        let line = line.unwrap();
        stdout.push_str(&line);
        stdout.push('\n');
        if line.contains("\"kind\":\"queued\"") {
            break;
        }
    }
    repo.release();
    for line in lines {
        stdout.push_str(&line.unwrap());
        stdout.push('\n');
    }
    assert!(cli.wait().unwrap().success(), "{stdout}");
    let replies: Vec<Value> = stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let places: Vec<u64> =
        replies.iter().filter(|r| r["kind"] == "queued").filter_map(|r| r["queue_position"].as_u64()).collect();
    assert!(places.first().is_some_and(|p| *p >= 2), "{stdout}");
    let started = replies.iter().find(|r| r["status"] == "started").unwrap();
    assert_eq!(started["builder"], "builder-a", "{stdout}");
    assert!(started["message"].as_str().unwrap().contains("on builder builder-a"), "{stdout}");
}

/// Invariant (docs/nixos.md, least privilege): a builder may make and use its own stream,
/// consumer and record bucket, never delete or purge a stream; a deployer may neither read nor
/// write the record; a `[fleet]` reader may read it, never write it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_role_has_only_the_jetstream_it_needs() {
    let nats = Nats::start_jetstream();
    let repo = Repo::new(&["g1"]);
    // The builder makes its stream, its consumer and the record's bucket.
    let _h = builder(&nats, &repo, "jetstream", "a", "");
    let asked = |client: async_nats::Client, subject: &'static str| async move {
        let answer = tokio::time::timeout(Duration::from_secs(2), client.request(subject, "".into())).await;
        matches!(answer, Ok(Ok(_)))
    };
    let b = builder_client(&nats).await;
    for subject in [
        "$JS.API.STREAM.DELETE.HEARTH_BUILDS",
        "$JS.API.STREAM.PURGE.HEARTH_BUILDS",
        "$JS.API.STREAM.DELETE.KV_hearth_fleet",
        "$JS.API.STREAM.PURGE.KV_hearth_fleet",
        "$JS.API.STREAM.DELETE.ANOTHER_APP",
        "$JS.API.CONSUMER.DELETE.HEARTH_BUILDS.hearth-builders",
    ] {
        assert!(!asked(b.clone(), subject).await, "the builder's {subject} was answered");
    }
    let js = async_nats::jetstream::new(b.clone());
    js.get_stream("HEARTH_BUILDS").await.unwrap().info().await.unwrap();
    js.get_stream("KV_hearth_fleet").await.unwrap().info().await.unwrap();
    // The deployer: no reading the record, no writing it.
    let kv = fleet_record(&nats).await;
    kv.put("fleet/probe", "{}".into()).await.unwrap();
    let d = nats.deployer().await;
    assert!(!asked(d.clone(), "$JS.API.STREAM.INFO.KV_hearth_fleet").await, "the deployer read the record's stream");
    d.publish("$KV.hearth_fleet.fleet/probe", "forged".into()).await.unwrap();
    d.flush().await.unwrap();
    assert_eq!(kv.get("fleet/probe").await.unwrap().as_deref(), Some(&b"{}"[..]), "the deployer wrote the record");
    // A `[fleet]` reader: reads and watches the record, never writes it or touches a stream.
    let r = nats.client(&nats.reader_seed, async_nats::ConnectOptions::new()).await;
    let reader_kv = async_nats::jetstream::new(r.clone()).get_key_value("hearth_fleet").await.unwrap();
    assert_eq!(reader_kv.get("fleet/probe").await.unwrap().as_deref(), Some(&b"{}"[..]));
    assert!(reader_kv.put("fleet/probe", "forged".into()).await.is_err(), "the reader wrote the record");
    for subject in ["$JS.API.STREAM.DELETE.KV_hearth_fleet", "$JS.API.STREAM.PURGE.HEARTH_BUILDS"] {
        assert!(!asked(r.clone(), subject).await, "the reader's {subject} was answered");
    }
    kv.delete("fleet/probe").await.unwrap();
}

/// Commits `flake.nix` with `web1` built by `script` to the repo at `dir`.
fn commit_web1(dir: &std::path::Path, script: String) -> String {
    std::fs::write(dir.join("flake.nix"), flake(&[("web1", script)])).unwrap();
    common::flake::git(dir, &["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-am", "web1"]);
    common::run_ok(Command::new("git").arg("-C").arg(dir).args(["rev-parse", "HEAD"])).trim().to_owned()
}

/// The shared record's entry of `host`.
async fn host_entry(record: &async_nats::jetstream::kv::Store, host: &str) -> Value {
    serde_json::from_slice(&record.get(format!("fleet/{host}")).await.unwrap().unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_commit_ending_later_never_becomes_the_hosts_state() {
    let nats = Nats::start_jetstream();
    let repo = Repo::new(&["web1"]);
    let dir = repo.dir.path().join("fleet");
    let (salt, gate) = (salt(), repo.gate.display().to_string());
    let base = commit_web1(&dir, format!("echo base {salt} > $out"));
    let a = builder(&nats, &repo, "jetstream", "builder-a", "");
    let b = builder(&nats, &repo, "jetstream", "builder-b", "");
    let client = nats.deployer().await;
    let replies = until_final(&mut request(&client, "web1", "base").await).await;
    assert_eq!(replies.last().unwrap()["status"], "completed", "{replies:?}");

    // C (older) waits for the gate on one builder while D (newer) is built by the other.
    let old =
        commit_web1(&dir, format!("while [ ! -e {gate}/release ]; do /bin/sleep 0.05; done; echo old {salt} > $out"));
    let mut slow = request(&client, "web1", "old").await;
    wait_until("one builder builds the old commit", Duration::from_secs(60), || started(&a) + started(&b) == 2);
    let new = commit_web1(&dir, format!("echo new {salt} > $out"));
    let fast = until_final(&mut request(&client, "web1", "new").await).await;
    assert_eq!(fast.last().unwrap()["status"], "completed", "{fast:?}");
    repo.release();
    let slow = until_final(&mut slow).await;
    assert_eq!(slow.last().unwrap()["status"], "completed", "{slow:?}");

    let record = fleet_record(&nats).await;
    let web1 = host_entry(&record, "web1").await;
    let generations = web1["generations"].as_array().unwrap();
    let numbered: Vec<(u64, &str)> =
        generations.iter().map(|g| (g["number"].as_u64().unwrap(), g["commit"].as_str().unwrap())).collect();
    assert_eq!(numbered, [(1, base.as_str()), (2, new.as_str())], "{web1:#}");
    assert_eq!(web1["last_build"]["commit"], new.as_str(), "{web1:#}");
    assert_eq!(web1["superseded"]["commit"], old.as_str(), "{web1:#}");
    // What changed is the newest against the base, whichever builder built either.
    assert_eq!((web1["changes"]["first_build"].as_bool(), web1["changes"]["paths_before"].as_u64()), (None, Some(1)));
    assert_eq!(web1["changes"]["rebuilt"], 1, "{web1:#}");
    // Both pages say so.
    for h in [&a, &b] {
        wait_until("the page shows the newest commit", Duration::from_secs(30), || {
            let fleet: Value = serde_json::from_slice(&h.get("/fleet.json").body).unwrap();
            fleet["hosts"][0]["generations"].as_array().unwrap().last().unwrap()["commit"] == new.as_str()
        });
    }
}

/// The interleaving a builder's fetch cannot see (ARCHITECTURE.md, "one history per host"):
/// builder A fetches the branch to order its commit; only then is a newer commit pushed, built
/// and recorded by builder B; then A writes. A's fetch does not know the newer commit, yet it
/// stays the host's state and A's older commit is kept apart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_commit_recorded_between_a_builders_fetch_and_its_write_stays_the_hosts_state() {
    let nats = Nats::start_jetstream();
    let repo = Repo::new(&["web1"]);
    let dir = repo.dir.path().join("fleet");
    let salt = salt();
    // A's `git` holds the ancestor listing that follows the fetch (its only `--max-count`)
    // until the test lets it on.
    let (fetched, go_on) = (repo.gate.join("a-fetched"), repo.gate.join("a-go-on"));
    let real_git = common::run_ok(Command::new("sh").args(["-c", "command -v git"])).trim().to_owned();
    let bin = repo.dir.path().join("a-bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::write(
        bin.join("git"),
        format!(
            "#!/bin/sh\ncase \" $* \" in *\" --max-count=\"*) : > {fetched}; while [ ! -e {go_on} ]; do /bin/sleep 0.05; done;; esac\nexec {real_git} \"$@\"\n",
            fetched = fetched.display(),
            go_on = go_on.display(),
        ),
    )
    .unwrap();
    common::set_mode(&bin.join("git"), 0o755);
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap());
    let a_config = builder_toml(&nats, &repo, "jetstream", "builder-a", "", "").render();
    let a = common::builder::start_env(&a_config, &[("PATH", &path)]);
    let client = nats.deployer().await;

    let older = commit_web1(&dir, format!("echo older {salt} > $out"));
    let mut older_sub = request_with(&client, "web1", "older", &format!(r#","rev":"{older}""#)).await;
    wait_until("builder A to fetch the branch for its record", Duration::from_secs(60), || fetched.exists());
    let newer = commit_web1(&dir, format!("echo newer {salt} > $out"));
    let b = builder(&nats, &repo, "jetstream", "builder-b", "");
    let newer_replies =
        until_final(&mut request_with(&client, "web1", "newer", &format!(r#","rev":"{newer}""#)).await).await;
    assert_eq!(newer_replies.last().unwrap()["status"], "completed", "{newer_replies:?}");
    assert_eq!(started(&b), 1, "builder B built the newer commit");
    std::fs::write(&go_on, "").unwrap();
    let older_replies = until_final(&mut older_sub).await;
    assert_eq!(older_replies.last().unwrap()["status"], "completed", "{older_replies:?}");
    assert_eq!(started(&a), 1, "builder A built the older commit");

    let web1 = host_entry(&fleet_record(&nats).await, "web1").await;
    let newest = web1["generations"].as_array().unwrap().last().unwrap()["commit"].clone();
    assert_eq!(newest, newer.as_str(), "{web1:#}");
    assert_eq!(web1["last_build"]["commit"], newer.as_str(), "{web1:#}");
    assert_eq!(web1["superseded"]["commit"], older.as_str(), "{web1:#}");
    until_queue_empty(&nats).await;
}

/// The same race many times, on two builders, the two commits ending in either order or at one
/// moment (ARCHITECTURE.md, "one history per host"): the newer commit is always the host's
/// state, each system is one generation numbered once, and the older one is either the
/// generation before it (it ended first) or kept apart as superseded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_commits_ending_in_any_order_leave_the_newer_as_the_hosts_state_round_after_round() {
    let nats = Nats::start_jetstream();
    let repo = Repo::new(&["web1"]);
    let dir = repo.dir.path().join("fleet");
    let (salt, gate) = (salt(), repo.gate.display().to_string());
    let a = builder(&nats, &repo, "jetstream", "builder-a", "");
    let b = builder(&nats, &repo, "jetstream", "builder-b", "");
    let client = nats.deployer().await;
    let record = fleet_record(&nats).await;
    // Each commit's system waits for its own gate file.
    let gated =
        |what: String| format!("while [ ! -e {gate}/{what} ]; do /bin/sleep 0.05; done; echo {what} {salt} > $out");
    let open = |what: &str| std::fs::write(repo.gate.join(what), "").unwrap();
    const ROUNDS: usize = 12;
    let mut superseded = 0;
    for round in 1..=ROUNDS {
        let (older_gate, newer_gate) = (format!("older{round}"), format!("newer{round}"));
        let older = commit_web1(&dir, gated(older_gate.clone()));
        let newer = commit_web1(&dir, gated(newer_gate.clone()));
        let mut older_sub = request_with(&client, "web1", &older_gate, &format!(r#","rev":"{older}""#)).await;
        let mut newer_sub = request_with(&client, "web1", &newer_gate, &format!(r#","rev":"{newer}""#)).await;
        wait_until("each builder builds one commit", Duration::from_secs(60), || {
            started(&a) + started(&b) == 2 * round
        });
        // Both at one moment, the older first, or the newer first.
        let (older_replies, newer_replies) = match round % 3 {
            0 => {
                open(&older_gate);
                open(&newer_gate);
                (until_final(&mut older_sub).await, until_final(&mut newer_sub).await)
            }
            1 => {
                open(&older_gate);
                let o = until_final(&mut older_sub).await;
                open(&newer_gate);
                (o, until_final(&mut newer_sub).await)
            }
            _ => {
                open(&newer_gate);
                let n = until_final(&mut newer_sub).await;
                open(&older_gate);
                (until_final(&mut older_sub).await, n)
            }
        };
        for replies in [&older_replies, &newer_replies] {
            assert_eq!(replies.last().unwrap()["status"], "completed", "round {round}: {replies:?}");
        }
        let web1 = host_entry(&record, "web1").await;
        let generations: Vec<(u64, &str)> = web1["generations"]
            .as_array()
            .unwrap()
            .iter()
            .map(|g| (g["number"].as_u64().unwrap(), g["commit"].as_str().unwrap()))
            .collect();
        assert_eq!(web1["last_build"]["commit"], newer.as_str(), "round {round}: {web1:#}");
        assert_eq!(generations.last().map(|g| g.1), Some(newer.as_str()), "round {round}: {web1:#}");
        assert!(generations.windows(2).all(|w| w[0].0 < w[1].0), "round {round}: numbered once: {web1:#}");
        let older_ended_first = generations.iter().rev().nth(1).is_some_and(|g| g.1 == older);
        let kept_apart = web1["superseded"]["commit"] == older.as_str();
        assert!(older_ended_first != kept_apart, "round {round}: the older commit is one or the other: {web1:#}");
        match round % 3 {
            1 => assert!(older_ended_first, "round {round}: {web1:#}"),
            2 => assert!(kept_apart, "round {round}: {web1:#}"),
            _ => superseded += usize::from(kept_apart),
        }
    }
    eprintln!("at one moment, the older commit was kept apart in {superseded} of {} rounds", ROUNDS / 3);
    until_queue_empty(&nats).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identical_requests_on_two_builders_cost_one_build_and_every_client_hears_it_end() {
    let nats = Nats::start_jetstream();
    let repo = Repo::new(&["g1"]);
    let a = builder(&nats, &repo, "jetstream", "builder-a", "");
    let b = builder(&nats, &repo, "jetstream", "builder-b", "");
    let client = nats.deployer().await;
    // Each page names both builders, alive, with the key each signs with.
    for h in [&a, &b] {
        wait_until("both builders are on the page", Duration::from_secs(30), || {
            let fleet: Value = serde_json::from_slice(&h.get("/fleet.json").body).unwrap();
            let alive = |name: &str| {
                fleet["builders"].as_array().into_iter().flatten().any(|b| b["name"] == name && b["alive"] == true)
            };
            alive("builder-a") && alive("builder-b") && fleet["trusted_public_keys"].as_array().unwrap().len() == 1
        });
    }
    let mut first = request(&client, "g1", "first").await;
    wait_until("a builder takes the first request", Duration::from_secs(60), || started(&a) + started(&b) == 1);
    let (running, other) = if started(&a) == 1 { (&a, &b) } else { (&b, &a) };
    // The page shows what the running builder builds, on both hearths.
    wait_until("the page shows the running build", Duration::from_secs(30), || {
        let page = other.get("/").text();
        page.contains("Builders") && page.contains("building g1 of fleet")
    });
    let mut second = request(&client, "g1", "second").await;
    // Whichever planned it second joins the other's build (the first may still be planning).
    let joined = "joined the identical build another builder runs";
    wait_until("one builder joins the other's build", Duration::from_secs(60), || {
        running.log().contains(joined) || other.log().contains(joined)
    });
    repo.release();
    let first = until_final(&mut first).await;
    let second = until_final(&mut second).await;
    for replies in [&first, &second] {
        let last = replies.last().unwrap();
        assert_eq!(last["status"], "completed", "{replies:?}");
        assert_eq!(last["hosts"][0]["host"], "g1", "{replies:?}");
    }
    let heard_joined = |replies: &[Value]| replies.iter().any(|r| r["kind"] == "joined");
    assert!(heard_joined(&first) || heard_joined(&second), "{first:?}\n{second:?}");
    until_queue_empty(&nats).await;
    // One build: one host recorded, by one builder.
    let built = running.log().matches("host built").count() + other.log().matches("host built").count();
    assert_eq!(built, 1, "built twice:\n{}\n{}", running.log(), other.log());
}

/// The same, many times, with both requests sent at one moment, so that the two builders plan
/// and claim at once (ARCHITECTURE.md, "no work done twice"): every round, one builds, the
/// other joins, and both clients hear the build end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identical_requests_sent_at_one_moment_cost_one_build_round_after_round() {
    let nats = Nats::start_jetstream();
    let repo = Repo::new(&["g1"]);
    let a = builder(&nats, &repo, "jetstream", "builder-a", "");
    let b = builder(&nats, &repo, "jetstream", "builder-b", "");
    let client = nats.deployer().await;
    let decided = |h: &Hearth| {
        let log = h.log();
        log.matches("claimed the build").count()
            + log.matches("joined the identical build another builder runs").count()
    };
    let built = || a.log().matches("host built").count() + b.log().matches("host built").count();
    const ROUNDS: usize = 20;
    for round in 1..=ROUNDS {
        if round > 1 {
            repo.next_commit();
        }
        let mut subs = Vec::new();
        for id in ["a", "b"] {
            subs.push(request(&client, "g1", &format!("r{round}{id}")).await);
        }
        // Each builder took one request and claimed or joined it; the build waits at the gate.
        wait_until("both builders decide on their request", Duration::from_secs(60), || {
            decided(&a) + decided(&b) >= 2 * round
        });
        repo.release();
        for sub in &mut subs {
            let replies = until_final(sub).await;
            let last = replies.last().unwrap();
            assert_eq!(last["status"], "completed", "round {round}: {replies:?}");
            assert_eq!(last["hosts"][0]["host"], "g1", "round {round}: {replies:?}");
        }
        assert_eq!(built(), round, "round {round}: built twice\n{}\n{}", a.log(), b.log());
    }
    until_queue_empty(&nats).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduler_on_every_builder_builds_a_commit_once_per_period() {
    let nats = Nats::start_jetstream();
    let repo = Repo::new(&["g1", "g2"]);
    repo.release();
    let a = builder(&nats, &repo, "jetstream", "builder-a", "");
    let b = builder(&nats, &repo, "jetstream", "builder-b", "");
    // Each builder's timer, one after the other, as `hearth build <repo> all --once-per 2h`.
    let scheduled = || {
        let out = Command::new(env!("CARGO_BIN_EXE_hearth"))
            .args([
                "build",
                "fleet",
                "all",
                "--once-per",
                "2h",
                "--json",
                "--nats-url",
                &nats.url(),
                "--nkey-seed-file",
            ])
            .arg(nats.seed_path())
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        serde_json::from_str::<Value>(stdout.lines().last().unwrap()).unwrap()
    };
    let first = scheduled();
    assert_eq!(first["status"], "completed", "{first}");
    let second = scheduled();
    assert_eq!(second["status"], "completed", "{second}");
    assert!(second["message"].as_str().unwrap().contains("built within the last 7200s"), "{second}");
    assert_eq!(second["hosts"].as_array().unwrap().len(), 2, "{second}");
    let built = a.log().matches("host built").count() + b.log().matches("host built").count();
    assert_eq!(built, 2, "each host once:\n{}\n{}", a.log(), b.log());
    // A new commit is built whatever the period.
    common::flake::git(
        &repo.dir.path().join("fleet"),
        &["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "new"],
    );
    let third = scheduled();
    assert!(!third["message"].as_str().unwrap().contains("from the record"), "{third}");
}

/// #31.6: routine restarts (SIGTERM, deploys) during one long build give the request back; they
/// never use up its deliveries, and a kill still does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_stops_never_use_up_a_requests_deliveries() {
    let nats = Nats::start_jetstream();
    let repo = Repo::new(&["g1"]);
    let client = nats.deployer().await;
    // The first builder makes the stream the request waits in.
    let mut h = builder_with(&nats, &repo, "jetstream", "builder-a", "", "max_deliver = 1");
    let mut sub = request(&client, "g1", "restarts").await;
    for round in 0..3 {
        if round > 0 {
            h = builder_with(&nats, &repo, "jetstream", "builder-a", "", "max_deliver = 1");
        }
        until_started(&h, &nats, 1).await;
        assert!(h.terminate().success());
        assert!(h.log().contains("the request goes back to the JetStream queue"), "round {round}:\n{}", h.log());
    }
    h = builder_with(&nats, &repo, "jetstream", "builder-a", "", "max_deliver = 1");
    until_started(&h, &nats, 1).await;
    repo.release();
    let replies = until_final(&mut sub).await;
    assert_eq!(replies.last().unwrap()["status"], "completed", "{replies:?}");
    assert_eq!(replies.iter().filter(|r| r["kind"] == "requeued").count(), 3, "{replies:?}");
    assert!(h.log().contains("delivery=4"), "{}", h.log());
    until_queue_empty(&nats).await;
}
