//! The build worker with a real nats-server (NKey users with the fleet's permissions), the real
//! Nix, and test flakes in local git repos whose hosts are plain `/bin/sh` derivations.
//! Hosts in `lab` wait for a file the test creates, so a test decides when a build ends.

#![allow(clippy::unwrap_used)] // Test code: a panic is a failed test.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::builder::BuilderToml;
use common::flake::{flake, make_repo};
use common::nats::Nats;
use common::{Hearth, hash_part, run_ok, set_mode};
use futures::StreamExt;
use serde_json::Value;

/// A nats-server, two flake repos and hearth with the builder, ready to take requests.
struct Fleet {
    // Dropped in this order: hearth stops (and sends its last replies) before NATS does.
    hearth: Hearth,
    nats: Nats,
    dir: tempfile::TempDir,
    gate: PathBuf,
    config: String,
}

impl Fleet {
    fn start(extra: &str) -> Self {
        Self::start_env(extra, &[])
    }

    fn start_env(extra: &str, env: &[(&str, &str)]) -> Self {
        Self::start_full(Nats::start(), extra, env)
    }

    fn start_full(nats: Nats, extra: &str, env: &[(&str, &str)]) -> Self {
        Self::start_inner(nats, "", extra, env)
    }

    /// `top` goes at the top of the config, `extra` into `[builder]`.
    fn start_top(top: &str, extra: &str) -> Self {
        Self::start_inner(Nats::start(), top, extra, &[])
    }

    fn start_inner(nats: Nats, top: &str, extra: &str, env: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        // Builders run as nixbld users: they must reach the gate directory.
        set_mode(dir.path(), 0o755);
        let gate = dir.path().join("gate");
        std::fs::create_dir(&gate).unwrap();
        set_mode(&gate, 0o777);
        let salt = common::flake::salt();
        let g = gate.display();
        make_repo(
            &dir.path().join("fleet"),
            &flake(&[
                ("good1", format!("echo good1 {salt} > $out")),
                ("good2", format!("echo good2 {salt} > $out")),
                ("bad", format!("echo {salt}; echo this host fails on purpose >&2; exit 1")),
                ("web-01.home", format!("echo web-01.home {salt} > $out")),
            ]),
        );
        make_repo(
            &dir.path().join("lab"),
            &flake(&[
                ("gate", format!("while [ ! -e {g}/release ]; do /bin/sleep 0.05; done; echo gate {salt} > $out")),
                ("gate2", format!("while [ ! -e {g}/release ]; do /bin/sleep 0.05; done; echo gate2 {salt} > $out")),
                ("slow", format!("echo $$ > {g}/slow.pid; exec /bin/sleep 1000")),
                ("diskhog", format!("/bin/head -c 50000000 /dev/zero > fill && echo {salt} > $out")),
                // 40 log lines of 2 KiB each, then a failure: its log tail alone is ~80 KiB.
                (
                    "loud",
                    format!(
                        "echo {salt}; l=x; for k in 1 2 3 4 5 6 7 8 9 10 11; do l=$l$l; done; i=0; while [ $i -lt 40 ]; do echo $i $l >&2; i=$((i+1)); done; exit 1"
                    ),
                ),
            ]),
        );
        let config = BuilderToml::new(&nats, &dir.path().join("gcroots"))
            .top(&format!("state_dir = \"{}\"\n{top}", dir.path().join("state").display()))
            .with("progress_interval_ms = 50\nqueue_size = 2")
            .with(extra)
            .repo("fleet", &format!("git+file://{}", dir.path().join("fleet").display()))
            .repo_on("lab", &format!("git+file://{}", dir.path().join("lab").display()), "master")
            .render();
        let hearth = common::builder::start_env(&config, env);
        Fleet { hearth, nats, dir, gate, config }
    }

    /// Stops hearth and starts it again with the same configuration.
    fn restart(&mut self) {
        self.hearth = common::builder::start(&self.config);
    }

    fn release(&self) {
        std::fs::write(self.gate.join("release"), "").unwrap();
    }

    /// Runs `hearth build … --json`; returns the exit code and the replies.
    fn cli(&self, args: &[&str]) -> (i32, Vec<Value>) {
        let out = Command::new(env!("CARGO_BIN_EXE_hearth"))
            .arg("build")
            .args(args)
            .args(["--json", "--nats-url", &self.nats.url(), "--nkey-seed-file"])
            .arg(self.nats.seed_path())
            .output()
            .unwrap();
        let replies = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
            .collect();
        (out.status.code().unwrap_or(-1), replies)
    }

    /// `hearth build` in the background; its JSON replies collect as they come.
    fn cli_spawn(&self, args: &[&str]) -> (Cli, std::sync::Arc<std::sync::Mutex<Vec<Value>>>) {
        let mut child = Command::new(env!("CARGO_BIN_EXE_hearth"))
            .arg("build")
            .args(args)
            .args(["--json", "--nats-url", &self.nats.url(), "--nkey-seed-file"])
            .arg(self.nats.seed_path())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let replies = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let stdout = child.stdout.take().unwrap();
        let sink = replies.clone();
        let reader = std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    sink.lock().unwrap().push(v);
                }
            }
        });
        (Cli { child, reader: Some(reader) }, replies)
    }

    fn metrics(&self) -> String {
        self.hearth.get("/metrics").text()
    }

    /// Publishes a raw request and returns a stream of the replies on its reply_to subject.
    async fn request(
        &self,
        client: &async_nats::Client,
        subject: &str,
        body: &str,
        reply_to: &str,
    ) -> async_nats::Subscriber {
        let sub = client.subscribe(reply_to.to_owned()).await.unwrap();
        client.flush().await.unwrap();
        client.publish(subject.to_owned(), body.to_owned().into()).await.unwrap();
        client.flush().await.unwrap();
        sub
    }
}

async fn next_reply(sub: &mut async_nats::Subscriber) -> Value {
    let msg = tokio::time::timeout(Duration::from_secs(120), sub.next())
        .await
        .expect("a reply in time")
        .expect("subscription open");
    serde_json::from_slice(&msg.payload).unwrap()
}

/// Reads replies until one with `status`; returns it.
async fn until_status(sub: &mut async_nats::Subscriber, status: &str) -> Value {
    loop {
        let r = next_reply(sub).await;
        assert_eq!(r["version"], 1);
        if r["status"] == status {
            return r;
        }
        let st = r["status"].as_str().unwrap();
        assert!(!["completed", "failed", "rejected"].contains(&st) || st == status, "final {r} before {status}");
    }
}

fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(series).and_then(|v| v.trim().strip_prefix("")).and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or_else(|| panic!("no series {series} in\n{text}"))
}

#[test]
fn one_host_builds_is_served_at_once_and_keeps_a_gc_root() {
    let f = Fleet::start("");
    let before = f.metrics();
    assert_eq!(metric(&before, "homelab_deploy_builds_total{repo=\"fleet\",status=\"success\"}"), 0.0);
    assert_eq!(metric(&before, "homelab_deploy_builds_total{repo=\"lab\",status=\"failure\"}"), 0.0);
    assert_eq!(metric(&before, "homelab_deploy_build_last_success_timestamp{repo=\"fleet\"}"), 0.0);

    let (code, replies) = f.cli(&["fleet", "good1"]);
    assert_eq!(code, 0, "{replies:?}");
    assert_eq!(replies.first().unwrap()["status"], "started");
    // No Nix call of the builder prints a deprecation warning into a reply or the log.
    assert!(!format!("{replies:?}").contains("deprecated"), "{replies:?}");
    assert!(!f.hearth.log().contains("deprecated"), "{}", f.hearth.log());
    let last = replies.last().unwrap();
    assert_eq!(last["status"], "completed");
    let out = last["out_path"].as_str().unwrap();
    assert!(out.starts_with("/nix/store/") && out.ends_with("-good1"), "{out}");
    assert_eq!(last["hosts"][0]["host"], "good1");
    assert_eq!(last["hosts"][0]["status"], "success");
    assert_eq!(last["commit"].as_str().unwrap().len(), 40);

    // Served the moment the build ended.
    let narinfo = f.hearth.get(&format!("/{}.narinfo", hash_part(out)));
    assert_eq!(narinfo.status, 200);
    let root = f.dir.path().join("gcroots/fleet/good1");
    assert_eq!(std::fs::read_link(&root).unwrap(), Path::new(out));

    let m = f.metrics();
    assert_eq!(metric(&m, "homelab_deploy_builds_total{repo=\"fleet\",status=\"success\"}"), 1.0);
    assert_eq!(metric(&m, "homelab_deploy_build_host_total{repo=\"fleet\",host=\"good1\",status=\"success\"}"), 1.0);
    assert_eq!(metric(&m, "homelab_deploy_build_duration_seconds_count{repo=\"fleet\",host=\"good1\"}"), 1.0);
    assert!(metric(&m, "homelab_deploy_build_last_success_timestamp{repo=\"fleet\"}") > 1.7e9);
    assert_eq!(metric(&m, "hearth_build_in_progress"), 0.0);
}

#[test]
fn all_with_one_failure_reports_each_host() {
    let f = Fleet::start("");
    let (code, replies) = f.cli(&["fleet", "all"]);
    assert_eq!(code, 1, "{replies:?}");
    let last = replies.last().unwrap();
    assert_eq!(last["status"], "failed");
    let hosts = last["hosts"].as_array().unwrap();
    let status = |h: &str| hosts.iter().find(|x| x["host"] == h).unwrap_or_else(|| panic!("{h} missing")).clone();
    assert_eq!(hosts.len(), 4);
    assert_eq!(status("good1")["status"], "success");
    assert_eq!(status("good2")["status"], "success");
    assert_eq!(status("bad")["status"], "failure");
    let error = status("bad")["error"].as_str().unwrap().to_owned();
    assert!(error.contains("this host fails on purpose"), "no log tail in {error}");
    assert!(last["message"].as_str().unwrap().contains("bad"));
    // Progress carried log lines.
    assert!(replies.iter().any(|r| r["status"] == "progress" && r["host"] == "bad"));
    // The operator's log says who failed, at which commit, and why, in words.
    let log = f.hearth.log();
    let line = log.lines().find(|l| l.contains(": build failed ")).unwrap_or_else(|| panic!("{log}"));
    for needle in ["WARN", "repo=fleet", "target=all", "failed=bad", "commit=", "duration=", "1 of 4 host(s) failed"] {
        assert!(line.contains(needle), "no `{needle}` in {line}");
    }
    assert!(!line.contains("Some(") && !line.contains("None"), "{line}");
    // Each host's result has a line of its own, and so has who asked.
    assert!(
        log.lines().any(|l| l.contains("WARN") && l.contains("host failed to build") && l.contains("host=bad")),
        "{log}"
    );
    assert!(log.lines().any(|l| l.contains("host built") && l.contains("host=good1")), "{log}");
    let asked = log.lines().find(|l| l.contains("build request accepted")).unwrap_or_else(|| panic!("{log}"));
    assert!(asked.contains("requested_by=hearth-build-cli "), "{asked}");

    let m = f.metrics();
    assert_eq!(metric(&m, "homelab_deploy_builds_total{repo=\"fleet\",status=\"failure\"}"), 1.0);
    assert_eq!(metric(&m, "homelab_deploy_builds_total{repo=\"fleet\",status=\"success\"}"), 0.0);
    assert_eq!(metric(&m, "homelab_deploy_build_host_total{repo=\"fleet\",host=\"bad\",status=\"failure\"}"), 1.0);
    assert_eq!(metric(&m, "homelab_deploy_build_host_total{repo=\"fleet\",host=\"good2\",status=\"success\"}"), 1.0);
    assert!(metric(&m, "homelab_deploy_build_last_timestamp{repo=\"fleet\"}") > 1.7e9);
    // Three hosts built: the repo has had a successful build; the broken one says so itself.
    let last_success = metric(&m, "homelab_deploy_build_last_success_timestamp{repo=\"fleet\"}");
    assert!(last_success > 1.7e9);
    assert_eq!(metric(&m, "hearth_host_last_build_success{repo=\"fleet\",host=\"bad\"}"), 0.0);
    assert_eq!(metric(&m, "hearth_host_last_build_success{repo=\"fleet\",host=\"good1\"}"), 1.0);
    assert_eq!(metric(&m, "hearth_builder_nats_connected"), 1.0);

    // After a restart: every host's series exists at 0 (so the next failure is an increase),
    // and the times and results come back from the record instead of 0.
    let mut f = f;
    f.restart();
    let m = f.metrics();
    assert_eq!(metric(&m, "homelab_deploy_build_host_total{repo=\"fleet\",host=\"bad\",status=\"failure\"}"), 0.0);
    assert!(m.contains("homelab_deploy_build_host_total{repo=\"fleet\",host=\"good1\",status=\"failure\"} 0"), "{m}");
    assert!(m.contains("homelab_deploy_builds_total{repo=\"lab\",status=\"success\"} 0"), "{m}");
    assert_eq!(metric(&m, "hearth_host_last_build_success{repo=\"fleet\",host=\"bad\"}"), 0.0);
    assert!(metric(&m, "homelab_deploy_build_last_success_timestamp{repo=\"fleet\"}") >= last_success - 1.0);

    // A host the flake no longer defines leaves the record (and the page) at the next `all`.
    let hosts_in_record = |f: &Fleet| -> Vec<String> {
        let fleet: Value = serde_json::from_slice(&f.hearth.get("/fleet.json").body).unwrap();
        fleet["hosts"].as_array().unwrap().iter().map(|h| h["host"].as_str().unwrap().to_owned()).collect()
    };
    assert!(hosts_in_record(&f).contains(&"bad".to_owned()));
    let repo = f.dir.path().join("fleet");
    let text = std::fs::read_to_string(repo.join("flake.nix")).unwrap();
    let kept: String = text.lines().filter(|l| !l.contains("\"bad\" = mk")).map(|l| format!("{l}\n")).collect();
    std::fs::write(repo.join("flake.nix"), kept).unwrap();
    common::flake::git(&repo, &["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "drop bad"]);
    let (code, replies) = f.cli(&["fleet", "all"]);
    assert_eq!(code, 0, "{replies:?}");
    let left = hosts_in_record(&f);
    assert!(!left.contains(&"bad".to_owned()) && left.contains(&"good1".to_owned()), "{left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_rejected_with_a_reason() {
    let f = Fleet::start("");
    let client = f.nats.deployer().await;
    let cases = [
        ("build.fleet.x", "{not json", "malformed"),
        (
            "build.fleet.x",
            r#"{"repo":"fleet","target":"x;rm -rf /","reply_to":"build.responses.r1"}"#,
            "invalid target",
        ),
        (
            "build.fleet.all",
            r#"{"repo":"fleet","target":"all","branch":"--upload-pack=x","reply_to":"build.responses.r2"}"#,
            "branch",
        ),
        ("build.fleet.all", r#"{"repo":"nope","target":"all","reply_to":"build.responses.r3"}"#, "unknown repo"),
    ];
    for (i, (subject, body, reason)) in cases.iter().enumerate() {
        // Malformed JSON has no reply_to: the reply goes to the message's reply subject.
        let reply = format!("build.responses.r{i}");
        let mut sub = client.subscribe(reply.clone()).await.unwrap();
        client.flush().await.unwrap();
        client.publish_with_reply(subject.to_string(), reply.clone(), body.to_string().into()).await.unwrap();
        client.flush().await.unwrap();
        let r = next_reply(&mut sub).await;
        assert_eq!(r["status"], "rejected", "{body}");
        assert!(r["message"].as_str().unwrap().contains(reason), "{body}: {r}");
    }
    // The worker is still there and builds.
    let (code, _) = f.cli(&["fleet", "good2"]);
    assert_eq!(code, 0);
    let m = f.metrics();
    assert_eq!(
        metric(&m, "hearth_build_rejected_total{repo=\"fleet\"}")
            + metric(&m, "hearth_build_rejected_total{repo=\"unknown\"}"),
        4.0
    );

    // The CLI refuses bad arguments itself, and reports a repo no builder serves.
    assert_eq!(f.cli(&["fleet", "a b"]).0, 2);
    assert_eq!(f.cli(&["no-such-repo", "all"]).0, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_queue_join_and_overflow() {
    let f = Fleet::start_top("shutdown_grace_seconds = 1", "");
    let client = f.nats.deployer().await;
    let req =
        |target: &str, id: &str| format!(r#"{{"repo":"lab","target":"{target}","reply_to":"build.responses.{id}"}}"#);
    let mut a = f.request(&client, "build.lab.gate", &req("gate", "a"), "build.responses.a").await;
    let started = until_status(&mut a, "started").await;
    assert_eq!(started["target"], "gate");
    // Same build again: joins the running one.
    let mut b = f.request(&client, "build.lab.gate", &req("gate", "b"), "build.responses.b").await;
    let joined = next_reply(&mut b).await;
    assert_eq!(joined["status"], "progress");
    assert!(joined["message"].as_str().unwrap().contains("joined"), "{joined}");
    // Another target waits, first in line; a third distinct one is second; a fourth overflows.
    let mut c = f.request(&client, "build.lab.gate2", &req("gate2", "c"), "build.responses.c").await;
    let queued = next_reply(&mut c).await;
    assert_eq!(queued["queue_position"], 1, "{queued}");
    let mut d = f.request(&client, "build.lab.all", &req("all", "d"), "build.responses.d").await;
    assert_eq!(next_reply(&mut d).await["queue_position"], 2);
    let mut e = f
        .request(
            &client,
            "build.fleet.good1",
            r#"{"repo":"fleet","target":"good1","reply_to":"build.responses.e"}"#,
            "build.responses.e",
        )
        .await;
    let full = next_reply(&mut e).await;
    assert_eq!(full["status"], "rejected");
    assert!(full["message"].as_str().unwrap().contains("queue is full"));
    assert_eq!(metric(&f.metrics(), "hearth_build_queue_length"), 2.0);
    assert_eq!(metric(&f.metrics(), "hearth_build_in_progress"), 1.0);

    f.release();
    let done_a = until_status(&mut a, "completed").await;
    let done_b = until_status(&mut b, "completed").await;
    assert_eq!(done_a["out_path"], done_b["out_path"], "the joined request got another build");
    let done_c = until_status(&mut c, "completed").await;
    assert!(done_c["out_path"].as_str().unwrap().ends_with("-gate2"));
    // `all` includes `slow`, which never finishes in time here: it is the default 4 h timeout's
    // job, so cut it by shutting hearth down (a 1 s grace) and expect "interrupted".
    until_status(&mut d, "started").await;
    drop(f);
    let last = until_status(&mut d, "interrupted").await;
    assert!(last["message"].as_str().unwrap().contains("interrupted by shutdown"), "{last}");
}

#[test]
fn a_running_build_gets_the_shutdown_grace_and_a_cut_one_is_interrupted_not_failed() {
    // A generous grace: SIGTERM while `gate` builds, then the gate opens: it completes.
    let mut f = Fleet::start_top("shutdown_grace_seconds = 120", "");
    let (mut cli, replies) = f.cli_spawn(&["lab", "gate"]);
    common::wait_until("the build to start", Duration::from_secs(60), || {
        replies.lock().unwrap().iter().any(|r: &Value| r["status"] == "started")
    });
    let pid = f.hearth.pid().to_string();
    run_ok(Command::new("kill").args(["-TERM", &pid]));
    f.hearth.wait_for_log("taking no new builds", 1);
    f.release();
    assert!(cli.wait().unwrap().success(), "{:?}", replies.lock().unwrap());
    assert_eq!(replies.lock().unwrap().last().unwrap()["status"], "completed");
    f.hearth.child.wait().unwrap();

    // A short grace: the slow build is cut and reported interrupted; the host is not FAILED.
    let mut f = Fleet::start_top("shutdown_grace_seconds = 1", "");
    let (mut cli, replies) = f.cli_spawn(&["lab", "slow"]);
    let pid_file = f.gate.join("slow.pid");
    common::wait_until("the build to run", Duration::from_secs(60), || pid_file.exists());
    let pid = f.hearth.pid().to_string();
    run_ok(Command::new("kill").args(["-TERM", &pid]));
    assert_eq!(cli.wait().unwrap().code(), Some(3), "{:?}", replies.lock().unwrap());
    let last = replies.lock().unwrap().last().unwrap().clone();
    assert_eq!(last["status"], "interrupted", "{last}");
    assert_eq!(last["hosts"][0]["status"], "interrupted", "{last}");
    f.hearth.child.wait().unwrap();
    f.restart();
    let m = f.metrics();
    assert!(!m.contains("host=\"slow\",status=\"failure\"} 1"), "an interrupted build counted as a failure:\n{m}");
    let fleet: Value = serde_json::from_slice(&f.hearth.get("/fleet.json").body).unwrap();
    assert!(fleet["hosts"].as_array().unwrap().iter().all(|h| h["host"] != "slow"), "{fleet}");
}

fn pid_alive(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default().contains(") Z ")
}

#[test]
fn the_timeout_kills_the_build() {
    let f = Fleet::start("build_timeout_seconds = 20");
    let (code, replies) = f.cli(&["lab", "slow"]);
    assert_eq!(code, 1, "{replies:?}");
    let last = replies.last().unwrap();
    assert_eq!(last["status"], "failed");
    assert!(last["hosts"][0]["error"].as_str().unwrap().contains("timed out"), "{last}");
    let pid: i32 = std::fs::read_to_string(f.gate.join("slow.pid")).unwrap().trim().parse().unwrap();
    common::wait_until(&format!("the builder {pid} to end with its timeout"), Duration::from_secs(30), || {
        !pid_alive(pid)
    });
}

#[test]
fn a_build_dies_with_a_killed_hearth() {
    let mut f = Fleet::start("");
    let mut cli = Command::new(env!("CARGO_BIN_EXE_hearth"))
        .args(["build", "lab", "slow", "--json", "--nats-url", &f.nats.url(), "--nkey-seed-file"])
        .arg(f.nats.seed_path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let pid_file = f.gate.join("slow.pid");
    common::wait_until("the build to run", Duration::from_secs(60), || {
        std::fs::read_to_string(&pid_file).is_ok_and(|t| t.ends_with('\n'))
    });
    let pid: i32 = std::fs::read_to_string(&pid_file).unwrap().trim().parse().unwrap();
    // SIGKILL: hearth cannot stop anything itself; its `nix build` must go with it.
    f.hearth.child.kill().unwrap();
    f.hearth.child.wait().unwrap();
    common::wait_until(&format!("the build {pid} to end with a killed hearth"), Duration::from_secs(30), || {
        !pid_alive(pid)
    });
    let _ = cli.kill();
    let _ = cli.wait();
}

#[test]
fn credentials_that_may_not_publish_requests_are_refused_at_once() {
    let f = Fleet::start("");
    let out = Command::new(env!("CARGO_BIN_EXE_hearth"))
        .args(["build", "fleet", "good1", "--timeout", "5m", "--nats-url", &f.nats.url(), "--nkey-seed-file"])
        .arg(&f.nats.watcher_seed)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("may not publish to build.fleet.good1"), "{stderr}");
}

#[test]
fn a_root_of_a_build_that_was_never_reported_is_removed_at_startup() {
    let mut f = Fleet::start("");
    let (code, replies) = f.cli(&["fleet", "good1"]);
    assert_eq!(code, 0, "{replies:?}");
    // As if hearth died after `nix build` made its out-link and before it recorded anything:
    // the link points at a system no generation holds.
    let other = common::add_to_store("unreported-system", b"never reported");
    let link = f.dir.path().join("gcroots/fleet/good1");
    std::fs::remove_file(&link).unwrap();
    std::os::unix::fs::symlink(&other, &link).unwrap();
    f.restart();
    common::wait_until("the unreported root to go", Duration::from_secs(60), || !link.exists());
    f.hearth.wait_for_log("removed a GC root of a build that was never reported", 1);
    // The recorded generation stays rooted and served.
    let out = replies.last().unwrap()["out_path"].as_str().unwrap();
    assert_eq!(f.hearth.get(&format!("/{}.narinfo", common::hash_part(out))).status, 200);
}

#[test]
fn the_cli_exits_3_without_a_final_reply() {
    let f = Fleet::start("");
    let (code, replies) = f.cli(&["lab", "gate", "--timeout", "2s"]);
    assert_eq!(code, 3, "{replies:?}");
    assert!(replies.iter().all(|r| r["status"] != "completed"));
    f.release();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_build_survives_a_nats_restart_and_its_final_reply_arrives() {
    let mut f = Fleet::start("");
    let client = f.nats.deployer().await;
    let mut sub = f
        .request(
            &client,
            "build.lab.gate",
            r#"{"repo":"lab","target":"gate","reply_to":"build.responses.nr"}"#,
            "build.responses.nr",
        )
        .await;
    until_status(&mut sub, "started").await;

    // NATS goes away mid-build and comes back refusing the builder, so that our client is
    // surely subscribed again before the builder can deliver anything.
    f.nats.restart(false);
    common::wait_until_async("the test client to reconnect", Duration::from_secs(60), || async {
        client.connection_state() == async_nats::connection::State::Connected
    })
    .await;
    client.flush().await.unwrap();
    // The build finishes while the builder is cut off.
    f.release();
    f.hearth.wait_for_log("build succeeded", 1);
    f.nats.reload(true);
    let done = until_status(&mut sub, "completed").await;
    assert!(done["out_path"].as_str().unwrap().ends_with("-gate"));
}

#[test]
fn a_missing_nkey_seed_file_stops_startup_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("h.toml");
    std::fs::write(
        &config,
        "[builder]\nnkey_seed_file = \"/nonexistent/seed\"\n[[builder.repos]]\nname = \"r\"\nurl = \"git+file:///r\"\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_hearth")).args(["serve", "--config"]).arg(&config).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/seed"));
    std::fs::write(dir.path().join("seed"), "SUnotaseed").unwrap();
    std::fs::write(
        &config,
        format!(
            "[builder]\nnkey_seed_file = \"{}\"\n[[builder.repos]]\nname = \"r\"\nurl = \"git+file:///r\"\n",
            dir.path().join("seed").display()
        ),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_hearth")).args(["serve", "--config"]).arg(&config).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not a valid NKey seed") && !err.contains("SUnotaseed"), "{err}");
}

/// `hearth build` running in the background (see `Fleet::cli_spawn`).
struct Cli {
    child: std::process::Child,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Cli {
    /// Waits for it to exit and for every reply it printed to be collected.
    fn wait(&mut self) -> std::io::Result<std::process::ExitStatus> {
        let status = self.child.wait()?;
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        Ok(status)
    }
}

/// A tmpfs mounted for one test, unmounted when dropped. Root's, not world-writable, and under
/// `/nix/var/nix`: Nix 2.30+ refuses a `build-dir` with a world-writable directory (such as
/// `/tmp`) on its way.
struct TinyDisk {
    dir: tempfile::TempDir,
}

impl TinyDisk {
    fn mount(size: &str) -> Self {
        let dir = tempfile::Builder::new().prefix("hearth-tiny-disk").tempdir_in("/nix/var/nix").unwrap();
        run_ok(
            Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0755"), "tmpfs"])
                .arg(dir.path()),
        );
        TinyDisk { dir }
    }
}

impl Drop for TinyDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.dir.path()).status();
    }
}

#[test]
fn a_full_disk_fails_the_build_clearly_and_the_cache_keeps_serving() {
    // Put where Nix builds on a disk too small for the build: $TMPDIR up to Nix 2.29, its
    // `build-dir` (default /nix/var/nix/builds) since 2.30.
    let disk = TinyDisk::mount("8m");
    let tmp = disk.dir.path().to_str().unwrap().to_owned();
    let nix_config = format!("substituters =\nbuild-dir = {tmp}\n");
    let mut env = vec![("TMPDIR", tmp.as_str())];
    if common::nix_version() >= (2, 30) {
        env.push(("NIX_CONFIG", &nix_config));
    }
    let f = Fleet::start_env("", &env);
    let (code, replies) = f.cli(&["lab", "diskhog"]);
    assert_eq!(code, 1, "{replies:?}");
    let last = replies.last().unwrap();
    assert_eq!(last["status"], "failed");
    let error = last["hosts"][0]["error"].as_str().unwrap();
    assert!(error.contains("No space left on device"), "{error}");
    assert_eq!(f.hearth.get("/cdnf7sl3i8vngkdz1zh3vqxzz3djw8wf.narinfo").status, 200);
    let (code, _) = f.cli(&["fleet", "good1"]);
    assert_eq!(code, 0, "the builder did not recover");
}

#[test]
fn a_final_reply_larger_than_the_nats_max_payload_still_arrives() {
    let f = Fleet::start_full(Nats::start_with("max_payload: 32768"), "", &[]);
    let (code, replies) = f.cli(&["lab", "loud"]);
    assert_eq!(code, 1, "no final reply: {replies:?}");
    let last = replies.last().unwrap();
    assert_eq!(last["status"], "failed");
    assert!(last["message"].as_str().unwrap().contains("cut to fit"), "{last}");
    assert!(serde_json::to_vec(last).unwrap().len() <= 32768);
    assert!(last["hosts"][0]["error"].as_str().unwrap().contains("39 xxxx"), "the end of the log is kept");
}

#[test]
fn the_branch_is_resolved_by_its_full_ref_name_only() {
    let f = Fleet::start("");
    let repo = f.dir.path().join("fleet");
    let master = run_ok(Command::new("git").arg("-C").arg(&repo).args(["rev-parse", "master"])).trim().to_owned();
    // A branch whose name ends like master's ref, pointing at a commit that breaks good1.
    let flake = std::fs::read_to_string(repo.join("flake.nix")).unwrap().replace("echo good1", "exit 1; echo good1");
    common::flake::git(&repo, &["checkout", "-q", "-b", "a/refs/heads/master"]);
    std::fs::write(repo.join("flake.nix"), flake).unwrap();
    common::flake::git(&repo, &["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-am", "spoof"]);
    common::flake::git(&repo, &["checkout", "-q", "master"]);
    let (code, replies) = f.cli(&["fleet", "good1"]);
    assert_eq!(code, 0, "{replies:?}");
    assert_eq!(replies.last().unwrap()["commit"], master.as_str());
    let (code, replies) = f.cli(&["fleet", "good1", "--branch", "nosuch"]);
    assert_eq!(code, 2, "an unknown branch is refused like an unknown host: {replies:?}");
    assert_eq!(replies.last().unwrap()["status"], "rejected");
    assert!(replies.last().unwrap()["message"].as_str().unwrap().contains("branch `nosuch` not found"));
}

#[test]
fn a_rev_is_built_only_on_a_branch_that_has_it() {
    let f = Fleet::start("");
    let repo = f.dir.path().join("fleet");
    let git = |args: &[&str]| common::flake::git(&repo, args);
    let rev_of = |r: &str| run_ok(Command::new("git").arg("-C").arg(&repo).args(["rev-parse", r])).trim().to_owned();
    let first = rev_of("master");
    // A commit on another branch only, and one more on master.
    git(&["checkout", "-q", "-b", "exp"]);
    std::fs::write(repo.join("exp.txt"), "exp").unwrap();
    git(&["add", "exp.txt"]);
    git(&["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "exp only"]);
    let exp = rev_of("exp");
    git(&["checkout", "-q", "master"]);
    std::fs::write(repo.join("more.txt"), "more").unwrap();
    git(&["add", "more.txt"]);
    git(&["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "more"]);

    let (code, replies) = f.cli(&["fleet", "good1", "--rev", &exp]);
    assert_eq!(code, 2, "{replies:?}");
    assert_eq!(replies.last().unwrap()["status"], "rejected");
    let last = replies.last().unwrap();
    assert!(last["message"].as_str().unwrap().contains(&format!("commit {exp} is not on branch `master`")), "{last}");
    assert!(last["hosts"].as_array().is_none_or(|h| h.is_empty()), "a host was built: {last}");
    // An older commit of master builds (named by a unique abbreviation), and so does exp's on
    // its own branch.
    let (code, replies) = f.cli(&["fleet", "good1", "--rev", &first[..10]]);
    assert_eq!(code, 0, "{replies:?}");
    assert_eq!(replies.last().unwrap()["commit"], first.as_str());
    let (code, replies) = f.cli(&["fleet", "good1", "--branch", "exp", "--rev", &exp]);
    assert_eq!(code, 0, "{replies:?}");
}

#[test]
fn a_dotted_host_builds_and_an_unknown_host_is_rejected_without_a_metric_series() {
    let f = Fleet::start("");
    let (code, replies) = f.cli(&["fleet", "web-01.home"]);
    assert_eq!(code, 0, "{replies:?}");
    assert!(replies.last().unwrap()["out_path"].as_str().unwrap().ends_with("-web-01.home"));

    let (code, replies) = f.cli(&["fleet", "god1"]);
    assert_eq!(code, 2, "{replies:?}");
    let last = replies.last().unwrap();
    assert_eq!(last["status"], "rejected");
    let message = last["message"].as_str().unwrap();
    assert!(message.contains("unknown host `god1`") && message.contains("good1"), "{message}");
    let m = f.metrics();
    assert!(!m.contains("god1"), "a series was made for an unknown host:\n{m}");
    assert_eq!(metric(&m, "homelab_deploy_builds_total{repo=\"fleet\",status=\"failure\"}"), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_with_a_rev_joins_only_a_build_of_that_commit() {
    let f = Fleet::start("");
    let client = f.nats.deployer().await;
    let lab = f.dir.path().join("lab");
    let head =
        |repo: &Path| run_ok(Command::new("git").arg("-C").arg(repo).args(["rev-parse", "HEAD"])).trim().to_owned();
    let old = head(&lab);
    let req = |rev: Option<&str>, id: &str| match rev {
        Some(r) => format!(r#"{{"repo":"lab","target":"gate","rev":"{r}","reply_to":"build.responses.{id}"}}"#),
        None => format!(r#"{{"repo":"lab","target":"gate","reply_to":"build.responses.{id}"}}"#),
    };
    let mut a = f.request(&client, "build.lab.gate", &req(None, "a"), "build.responses.a").await;
    let building = loop {
        let r = next_reply(&mut a).await;
        if r["message"] == "building gate" {
            break r;
        }
    };
    assert_eq!(building["commit"], old.as_str());
    // A new commit lands while the first build runs.
    std::fs::write(lab.join("NEWS"), "new\n").unwrap();
    common::flake::git(&lab, &["add", "NEWS"]);
    common::flake::git(&lab, &["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "news"]);
    let new = head(&lab);
    let mut b = f.request(&client, "build.lab.gate", &req(Some(&new), "b"), "build.responses.b").await;
    let queued = next_reply(&mut b).await;
    assert_eq!(queued["queue_position"], 1, "a request for another commit joined: {queued}");
    let mut c = f.request(&client, "build.lab.gate", &req(Some(&old), "c"), "build.responses.c").await;
    assert!(next_reply(&mut c).await["message"].as_str().unwrap().contains("joined"));
    f.release();
    assert_eq!(until_status(&mut a, "completed").await["commit"], old.as_str());
    assert_eq!(until_status(&mut c, "completed").await["commit"], old.as_str());
    assert_eq!(until_status(&mut b, "completed").await["commit"], new.as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untrusted_fields_cannot_forge_log_lines() {
    let f = Fleet::start("");
    let client = f.nats.deployer().await;
    let body = r#"{"repo":"fleet\n2026-01-01T00:00:00Z  INFO hearth::builder: build succeeded repo=forged","target":"all","reply_to":"build.responses.forge"}"#;
    let mut sub = f.request(&client, "build.fleet.all", body, "build.responses.forge").await;
    assert_eq!(next_reply(&mut sub).await["status"], "rejected");
    f.hearth.wait_for_log("build request rejected", 1);
    let log = f.hearth.log();
    assert!(!log.lines().any(|l| l.starts_with("2026-01-01")), "a request forged a log line:\n{log}");
    assert!(log.contains("\\n2026-01-01"), "the field is not in the log, escaped:\n{log}");
}

/// Four hosts that share a derivation: two good, one whose own dependency fails to build, one
/// whose evaluation fails. Built as one graph by two evaluators.
const GRAPH_FLAKE: &str = r#"{
  outputs = { self }:
    let
      drv = name: script: deps: derivation {
        inherit name deps;
        system = "SYSTEM";
        builder = "/bin/sh";
        args = [ "-c" script ];
      };
      shared = drv "shared-SALT" "echo shared > $out" [ ];
      broken = drv "broken-SALT" "echo the broken dependency fails on purpose; exit 1" [ ];
      host = name: deps: { config.system.build.toplevel = drv name "echo ${name} $deps > $out" deps; };
    in {
      nixosConfigurations = {
        one = host "one" [ shared ];
        two = host "two" [ shared ];
        buildbad = host "buildbad" [ shared broken ];
        evalbad = { config.system.build.toplevel = throw "evalbad is broken on purpose"; };
      };
    };
}
"#;

#[test]
fn one_graph_gives_each_host_its_own_outcome_and_unchanged_hosts_build_nothing() {
    let f = Fleet::start("eval_workers = 2");
    f.hearth.wait_for_log("eval_workers=2", 1);
    let repo = f.dir.path().join("fleet");
    let text = GRAPH_FLAKE.replace("SYSTEM", &common::flake::system()).replace("SALT", &common::flake::salt());
    std::fs::write(repo.join("flake.nix"), text).unwrap();
    common::flake::git(&repo, &["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "graph"]);

    let (code, replies) = f.cli(&["fleet", "all"]);
    assert_eq!(code, 1, "{replies:?}");
    let last = replies.last().unwrap();
    let hosts = last["hosts"].as_array().unwrap();
    let host = |h: &str| hosts.iter().find(|x| x["host"] == h).unwrap_or_else(|| panic!("{h} missing in {last}"));
    assert_eq!(host("one")["status"], "success", "{last}");
    assert_eq!(host("two")["status"], "success", "{last}");
    assert_eq!(host("buildbad")["status"], "failure", "{last}");
    assert_eq!(host("evalbad")["status"], "failure", "{last}");
    // Each failure says its own cause: the derivation that failed with its own log, and the
    // evaluation error.
    let build_error = host("buildbad")["error"].as_str().unwrap();
    assert!(build_error.contains("-broken-") && build_error.contains("fails on purpose"), "{build_error}");
    assert!(!build_error.contains("evalbad"), "{build_error}");
    let eval_error = host("evalbad")["error"].as_str().unwrap();
    assert!(eval_error.contains("evalbad is broken on purpose"), "{eval_error}");
    assert!(last["message"].as_str().unwrap().contains("2 of 4 host(s) failed"), "{last}");

    // Progress replies carried every host's phase and counts; the last one saw the outcome.
    let progress: Vec<&Value> = replies.iter().filter(|r| r["progress"].is_array()).collect();
    assert!(!progress.is_empty(), "{replies:?}");
    assert!(progress.iter().any(|r| r["progress"].as_array().unwrap().iter().any(|p| p["phase"] == "evaluating")));
    let final_progress = progress.last().unwrap()["progress"].as_array().unwrap();
    let phase = |h: &str| final_progress.iter().find(|p| p["host"] == h).unwrap().clone();
    assert_eq!(phase("one")["phase"], "done", "{final_progress:?}");
    assert_eq!((phase("one")["built"].as_u64(), phase("one")["to_build"].as_u64()), (Some(2), Some(2)));
    assert_eq!(phase("buildbad")["phase"], "failed", "{final_progress:?}");
    assert_eq!(phase("evalbad")["phase"], "failed", "{final_progress:?}");
    let log = f.hearth.log();
    assert!(log.contains("host failed to evaluate") && log.contains("host=evalbad"), "{log}");

    // The same commit again: the good hosts are unchanged at once (no generation, no changes),
    // counted as successes; the broken ones fail again.
    let (code, replies) = f.cli(&["fleet", "all"]);
    assert_eq!(code, 1, "{replies:?}");
    let last = replies.last().unwrap();
    let hosts = last["hosts"].as_array().unwrap();
    let host = |h: &str| hosts.iter().find(|x| x["host"] == h).unwrap().clone();
    assert_eq!(host("one")["status"], "unchanged", "{last}");
    assert_eq!(host("two")["status"], "unchanged", "{last}");
    assert_eq!(host("buildbad")["status"], "failure", "{last}");
    let changes = &host("one")["changes"];
    assert_eq!(changes["changed"].as_array().map(Vec::len), Some(0), "{changes}");
    assert_eq!(changes["added"].as_array().map(Vec::len), Some(0), "{changes}");
    let generations = std::fs::read_dir(f.dir.path().join("gcroots/fleet/.generations/one")).unwrap().count();
    assert_eq!(generations, 1);
    let m = f.metrics();
    assert_eq!(metric(&m, "homelab_deploy_build_host_total{repo=\"fleet\",host=\"one\",status=\"success\"}"), 2.0);
    assert_eq!(metric(&m, "hearth_host_last_build_success{repo=\"fleet\",host=\"one\"}"), 1.0);
    assert_eq!(metric(&m, "hearth_host_last_build_success{repo=\"fleet\",host=\"evalbad\"}"), 0.0);
}

#[test]
fn a_host_leaves_the_record_only_when_the_deploy_branchs_newest_commit_drops_it() {
    let f = Fleet::start("");
    let repo = f.dir.path().join("fleet");
    let rev_of = |r: &str| run_ok(Command::new("git").arg("-C").arg(&repo).args(["rev-parse", r])).trim().to_owned();
    let commit = |text: &str, message: &str| {
        std::fs::write(repo.join("flake.nix"), text).unwrap();
        common::flake::git(&repo, &["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", message]);
    };
    let hosts = || -> Vec<String> {
        let fleet: Value = serde_json::from_slice(&f.hearth.get("/fleet.json").body).unwrap();
        let mut hosts: Vec<String> = fleet["hosts"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|h| h["repo"] == "fleet")
            .map(|h| h["host"].as_str().unwrap().to_owned())
            .collect();
        hosts.sort();
        hosts
    };
    let without_extra = std::fs::read_to_string(repo.join("flake.nix")).unwrap();
    let older = rev_of("master");
    let salt = common::flake::salt();
    let with_extra = without_extra.replacen(
        "        \"good1\" = mk",
        &format!("        \"extra\" = mk \"extra\" \"echo extra {salt} > $out\";\n        \"good1\" = mk"),
        1,
    );
    assert_ne!(with_extra, without_extra);
    commit(&with_extra, "add extra");
    f.cli(&["fleet", "all"]);
    assert!(hosts().contains(&"extra".to_owned()), "{:?}", hosts());

    // A build of an older commit that lacks the host (pinned with --rev) keeps it.
    let (_, replies) = f.cli(&["fleet", "all", "--rev", &older]);
    assert_eq!(replies.last().unwrap()["commit"], older.as_str(), "{replies:?}");
    assert!(hosts().contains(&"extra".to_owned()), "a pinned older commit dropped a host: {:?}", hosts());

    // The branch's newest commit dropping it does.
    commit(&without_extra, "drop extra");
    f.cli(&["fleet", "all"]);
    assert!(!hosts().contains(&"extra".to_owned()), "{:?}", hosts());
    assert!(hosts().contains(&"good1".to_owned()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_is_recorded_and_reported_when_its_own_closure_is_built_whatever_the_rest_does() {
    // Derivations build side by side, as on any real builder (Nix's default is one at a time).
    let f = Fleet::start_env("", &[("NIX_CONFIG", "substituters =\nmax-jobs = 8\n")]);
    let client = f.nats.deployer().await;
    let body = r#"{"repo":"lab","target":"all","reply_to":"build.responses.early"}"#;
    let mut sub = f.request(&client, "build.lab.all", body, "build.responses.early").await;
    // `gate` waits for the release and `slow` never ends; `diskhog` builds at once.
    let done = loop {
        let r = next_reply(&mut sub).await;
        assert!(r["status"] == "started" || r["status"] == "progress", "a final reply first: {r}");
        if r["kind"] == "host_done" && r["host"] == "diskhog" {
            break r;
        }
    };
    assert_eq!(done["host_status"], "success", "{done}");
    // Recorded already: its generation is on the page while the graph still runs.
    let fleet: Value = serde_json::from_slice(&f.hearth.get("/fleet.json").body).unwrap();
    let diskhog = fleet["hosts"].as_array().unwrap().iter().find(|h| h["host"] == "diskhog").cloned();
    let diskhog = diskhog.unwrap_or_else(|| panic!("diskhog is not in the record yet: {fleet}"));
    assert_eq!(diskhog["generations"][0]["path"], done["out_path"], "{diskhog}");
    assert!(!f.gate.join("release").exists(), "the gate is still closed: the graph still runs");
}

#[test]
fn an_evaluation_past_its_memory_bound_is_stopped_and_says_so() {
    let nats = Nats::start();
    let dir = tempfile::tempdir().unwrap();
    set_mode(dir.path(), 0o755);
    let salt = common::flake::salt();
    // Evaluating `hog` makes a list of 50 million thunks (gigabytes); `fine` is a plain host.
    let hog = "${toString (builtins.length (builtins.genList (x: x * 2) 50000000))}".to_owned();
    make_repo(&dir.path().join("mem"), &flake(&[("fine", format!("echo fine {salt} > $out")), ("hog", hog)]));
    let h = BuilderToml::new(&nats, &dir.path().join("gcroots"))
        .with("eval_max_memory = \"256MiB\"")
        .repo("mem", &format!("git+file://{}", dir.path().join("mem").display()))
        .start();
    let out = Command::new(env!("CARGO_BIN_EXE_hearth"))
        .args(["build", "mem", "all", "--json", "--nats-url", &nats.url(), "--nkey-seed-file"])
        .arg(nats.seed_path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last: Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(last["status"], "failed", "{stdout}");
    let hosts = last["hosts"].as_array().unwrap_or_else(|| panic!("no hosts in {last}"));
    let host = |name: &str| hosts.iter().find(|x| x["host"] == name).cloned().unwrap();
    assert_eq!(host("fine")["status"], "success", "{last}");
    let error = host("hog")["error"].as_str().unwrap().to_owned();
    assert!(error.starts_with("evaluation of hog exceeded 256.0 MiB of memory"), "{error}");
    drop(h);
}

#[test]
fn every_host_the_deploy_branch_defines_has_its_series_at_0_from_startup() {
    let f = Fleet::start("");
    // No build yet: the series come from the flake itself.
    let series = "homelab_deploy_build_host_total{repo=\"fleet\",host=\"web-01.home\",status=\"failure\"}";
    let lab = "homelab_deploy_build_host_total{repo=\"lab\",host=\"gate\",status=\"success\"}";
    common::wait_until("the defined hosts' series", Duration::from_secs(60), || {
        let text = f.metrics();
        text.contains(series) && text.contains(lab)
    });
    assert_eq!(metric(&f.metrics(), series), 0.0);
    assert_eq!(metric(&f.metrics(), lab), 0.0);
}
