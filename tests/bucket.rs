//! Pushing what the builder built to an S3 bucket: a real three-node Garage cluster
//! (`scripts/garage`, replication factor 3), a real nats-server and the real Nix. After a host
//! build, a fresh store substitutes the host's whole system from the bucket's website endpoint
//! and verifies its signatures; every narinfo says what `nix copy --to file://…?compression=zstd`
//! with the same key says, and every object's FileHash and FileSize are its bytes'. A cache-only
//! hearth reads through the bucket (streamed, copied once however many pull, or redirected to
//! its public URL); a hot NAR is compressed once for serving and for the bucket; the fleet
//! record follows each push to its end.

#![allow(clippy::unwrap_used)] // Test code: a panic is a failed test.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::builder::BuilderToml;
use common::flake::{make_repo, salt, system};
use common::garage::Garage;
use common::nats::Nats;
use common::{Hearth, nix_cmd, run_ok, wait_until};
use hearth::nix::narinfo::NarInfo;
use serde_json::Value;
use sha2::Digest;

/// A host whose system depends on two packages, one of them large enough for a multipart upload.
fn repo(dir: &Path) -> PathBuf {
    let s = salt();
    let flake = format!(
        r#"{{
  outputs = {{ self }}:
    let
      drv = name: script: deps: derivation {{ inherit name deps; system = "{sys}"; builder = "/bin/sh"; args = [ "-c" script ]; }};
      small = drv "small-{s}" "echo small {s} > $out" [ ];
      big = drv "big-{s}" "i=0; while [ $i -lt 20 ]; do /bin/head -c 1048576 /dev/urandom >> $out; i=$((i+1)); done" [ ];
    in {{
      nixosConfigurations.web1.config.system.build.toplevel =
        drv "nixos-system-web1-{s}" "echo $deps > $out" [ small big ];
    }};
}}
"#,
        sys = system()
    );
    let path = dir.join("fleet");
    make_repo(&path, &flake);
    path
}

/// What most tests here start from: a Garage cluster, a nats-server, a work directory and the
/// flake of [`repo`] in it.
struct Rig {
    garage: Garage,
    nats: Nats,
    work: tempfile::TempDir,
    fleet: PathBuf,
}

impl Rig {
    fn start() -> Self {
        let garage = Garage::start();
        let nats = Nats::start();
        let work = tempfile::tempdir().unwrap();
        let fleet = repo(work.path());
        Rig { garage, nats, work, fleet }
    }
}

/// The `[bucket]` section for `garage`'s bucket, with `extra` lines.
fn bucket_section(garage: &Garage, extra: &str) -> String {
    format!(
        r#"
[bucket]
url = "s3://{bucket}?endpoint={endpoint}&region={region}"
access_key_id_file = "{id}"
secret_access_key_file = "{secret}"
{extra}
"#,
        bucket = garage.get("GARAGE_BUCKET"),
        endpoint = garage.get("GARAGE_S3"),
        region = garage.get("GARAGE_REGION"),
        id = garage.get("GARAGE_ACCESS_KEY_ID_FILE"),
        secret = garage.get("GARAGE_SECRET_ACCESS_KEY_FILE"),
    )
}

/// A hearth config: the bucket (with `bucket_extra` lines), a builder of `fleet` (with
/// `builder_extra` lines).
fn pushing_config(
    garage: &Garage,
    nats: &Nats,
    work: &Path,
    fleet: &Path,
    bucket_extra: &str,
    builder_extra: &str,
) -> String {
    BuilderToml::new(nats, &work.join("gcroots"))
        .top(&format!("state_dir = \"{}\"\n{}", work.join("state").display(), bucket_section(garage, bucket_extra)))
        .with(builder_extra)
        .repo("fleet", &format!("git+file://{}", fleet.display()))
        .render()
}

/// A cache-only hearth reading through the bucket (with `extra` lines), its store the one at
/// `root`.
fn cache_only(root: &Path, garage: &Garage, extra: &str) -> Hearth {
    Hearth::start(&format!(
        r#"
[store]
backend = "db"
db_path = "{root}/nix/var/nix/db/db.sqlite"
real_dir = "{root}/nix/store"

{bucket}"#,
        root = root.display(),
        bucket = bucket_section(garage, &format!("read_through = true\n{extra}")),
    ))
}

/// Waits until the fleet record says the push of web1's newest system has ended (it is set
/// before the build's reply), and returns it; none of it failed.
fn wait_for_push(hearth: &Hearth) -> Value {
    let mut last = Value::Null;
    wait_until("the push of the system ends", Duration::from_secs(120), || {
        let fleet: Value = serde_json::from_str(&hearth.get("/fleet.json").text()).unwrap();
        last = fleet["hosts"][0]["bucket"].clone();
        last["queued"].as_u64() == Some(0)
    });
    assert_eq!(last["failed"].as_u64(), Some(0), "{last}");
    last
}

/// `hearth build fleet web1`: its final reply.
fn build(nats: &Nats) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_hearth"))
        .args(["build", "fleet", "web1", "--json", "--nats-url", &nats.url(), "--nkey-seed-file"])
        .arg(nats.seed_path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    serde_json::from_str(stdout.lines().last().unwrap()).unwrap()
}

/// `hearth bucket gc --grace 0s` with `more` arguments: its output; it succeeded.
fn gc_cli(config: &Path, more: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_hearth"))
        .args(["bucket", "gc", "--grace", "0s", "--config"])
        .arg(config)
        .args(more)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn hash(p: &str) -> String {
    p.trim_start_matches("/nix/store/").split('-').next().unwrap().to_owned()
}

/// Substitutes `system` from the binary cache at `from` into a fresh store, trusting only the
/// test key, and verifies every path's contents and signature there.
fn substitute_and_verify(from: &str, system: &str) {
    let public = std::fs::read_to_string(common::nix_wire().join("keys/test.pub")).unwrap();
    let dest = tempfile::tempdir().unwrap();
    let store = format!("local?root={}", dest.path().display());
    let copied = nix_cmd("nix")
        .args(["copy", "--from", from, "--to", &store])
        .args(["--option", "trusted-public-keys", public.trim(), system])
        .output()
        .unwrap();
    assert!(copied.status.success(), "nix copy --from {from}: {}", String::from_utf8_lossy(&copied.stderr));
    let verified = nix_cmd("nix")
        .args(["store", "verify", "--store", &store])
        .args(["--option", "trusted-public-keys", public.trim(), "-r", system])
        .output()
        .unwrap();
    assert!(verified.status.success(), "{}", String::from_utf8_lossy(&verified.stderr));
}

/// The store paths of `system`'s closure.
fn closure_of(system: &str) -> Vec<String> {
    run_ok(nix_cmd("nix-store").args(["-qR", system])).lines().map(str::to_owned).collect()
}

/// Waits until every path of `closure` has its narinfo in the bucket.
fn wait_in_bucket(garage: &Garage, closure: &[String], what: &str) {
    wait_until(what, Duration::from_secs(120), || {
        closure.iter().all(|p| garage.web(&format!("{}.narinfo", hash(p))).is_some())
    });
}

fn sha256_nix32(bytes: &[u8]) -> String {
    format!("sha256:{}", hearth::nix::nixbase32::encode(&sha2::Sha256::digest(bytes)))
}

#[test]
fn a_built_system_is_pushed_in_nixs_layout_and_substitutes_from_the_bucket() {
    let Rig { garage, nats, work, fleet } = Rig::start();
    let config = pushing_config(&garage, &nats, work.path(), &fleet, "upload_concurrency = 2", "");
    let hearth = common::builder::start(&config);
    let last = build(&nats);
    let system = last["out_path"].as_str().unwrap().to_owned();
    let uploaded = &last["hosts"][0]["uploaded"];
    // The whole closure, three paths, as its push stands when the reply goes (it never waits
    // for the bucket).
    assert_eq!(uploaded["total"].as_u64(), Some(3), "{last}");

    // Every path's narinfo appears once its upload is done.
    let closure = closure_of(&system);
    wait_in_bucket(&garage, &closure, "the closure is in the bucket");
    assert!(garage.web("nix-cache-info").is_some_and(|b| String::from_utf8_lossy(&b).contains("StoreDir: /nix/store")));
    // The fleet record, and with it the page, says so once the uploads have ended.
    let pushed = wait_for_push(&hearth);
    assert_eq!((pushed["present"].as_u64(), pushed["total"].as_u64()), (Some(3), Some(3)), "{pushed}");
    assert!(hearth.get("/").text().contains("in the bucket: <span class=\"ok\">all 3 paths</span>"));

    // Nix's own writer with the same key, for comparison.
    let key = common::nix_wire().join("keys/test.sec");
    let reference = tempfile::tempdir().unwrap();
    run_ok(nix_cmd("nix").args([
        "copy",
        "--to",
        &format!("file://{}?compression=zstd&secret-key={}", reference.path().display(), key.display()),
        &system,
    ]));
    for path in &closure {
        let ours = NarInfo::parse(&String::from_utf8(garage.web(&format!("{}.narinfo", hash(path))).unwrap()).unwrap())
            .unwrap();
        let theirs =
            NarInfo::parse(&std::fs::read_to_string(reference.path().join(format!("{}.narinfo", hash(path)))).unwrap())
                .unwrap();
        assert_eq!(ours.store_path, theirs.store_path);
        assert_eq!((&ours.nar_hash, ours.nar_size), (&theirs.nar_hash, theirs.nar_size), "{path}");
        assert_eq!(ours.references, theirs.references, "{path}");
        assert_eq!(ours.deriver, theirs.deriver, "{path}");
        assert_eq!(ours.sigs, theirs.sigs, "{path}");
        assert_eq!(ours.compression, "zstd");
        // The object at the URL is the file the narinfo describes.
        let nar = garage.web(&ours.url).unwrap_or_else(|| panic!("{path}: no {}", ours.url));
        assert_eq!(ours.file_hash.as_deref(), Some(sha256_nix32(&nar).as_str()), "{path}");
        assert_eq!(ours.file_size, Some(nar.len() as u64), "{path}");
        assert_eq!(
            ours.url,
            format!("nar/{}.nar.zst", ours.file_hash.as_deref().unwrap().trim_start_matches("sha256:"))
        );
    }

    // A fresh store substitutes the whole system from the bucket alone, and verifies it.
    substitute_and_verify(garage.get("GARAGE_WEB"), &system);

    // The same system again: every path is there, nothing is uploaded again.
    let objects = hearth.metric("hearth_bucket_upload_objects_total");
    build(&nats);
    let pushed = wait_for_push(&hearth);
    assert_eq!(pushed["present"].as_u64(), Some(3), "{pushed}");
    assert_eq!(hearth.metric("hearth_bucket_upload_objects_total"), objects);
    let m = hearth.get("/metrics").text();
    assert!(m.contains("hearth_bucket_upload_failures_total 0"), "{m}");
    assert!(m.contains("hearth_bucket_upload_queue_length 0"), "{m}");

    // A cache-only hearth whose store holds none of it serves the system through the bucket.
    let local = tempfile::tempdir().unwrap();
    let seed = common::add_to_store("read-through-seed", salt().as_bytes());
    run_ok(nix_cmd("nix").args(["copy", "--to", &format!("local?root={}", local.path().display()), &seed]));
    let through = cache_only(local.path(), &garage, "");
    substitute_and_verify(&through.url(), &system);
    // A range of a NAR is the bucket's bytes; a path in neither place is a 404.
    let narinfo = NarInfo::parse(&through.get(&format!("/{}.narinfo", hash(&system))).text()).unwrap();
    let whole = garage.web(&narinfo.url).unwrap();
    let part = common::request(&through.addr, "GET", &format!("/{}", narinfo.url), &[("Range", "bytes=10-99")]);
    assert_eq!(part.status, 206);
    assert_eq!(part.body, whole[10..100].to_vec());
    assert_eq!(through.get("/00000000000000000000000000000000.narinfo").status, 404);
    // With a public URL, a NAR not here is a redirect to the bucket itself, which Nix follows.
    let redirecting = cache_only(local.path(), &garage, &format!("public_url = \"{}/\"", garage.get("GARAGE_WEB")));
    let moved = redirecting.get(&format!("/{}", narinfo.url));
    assert_eq!(moved.status, 302);
    assert_eq!(moved.header("location"), Some(format!("{}/{}", garage.get("GARAGE_WEB"), narinfo.url).as_str()));
    substitute_and_verify(&redirecting.url(), &system);

    // A fresh read-through hearth fetches a NAR from the bucket once, however many ask at once.
    let big = closure.iter().find(|p| p.contains("-big-")).unwrap();
    let big_url = NarInfo::parse(&through.get(&format!("/{}.narinfo", hash(big))).text()).unwrap().url;
    let want = garage.web(&big_url).unwrap();
    let fresh = cache_only(local.path(), &garage, "");
    let pulls: Vec<_> = (0..6)
        .map(|_| {
            let (addr, target) = (fresh.addr.clone(), format!("/{big_url}"));
            std::thread::spawn(move || common::request(&addr, "GET", &target, &[]))
        })
        .collect();
    for pull in pulls {
        let got = pull.join().unwrap();
        assert_eq!(got.status, 200);
        assert!(got.body == want, "a pull got other bytes than the bucket holds");
    }
    assert_eq!(fresh.metric("hearth_bucket_read_cache_fills_total"), 1.0);
    // A bucket object whose bytes are not its name's is never served whole from a copy.
    let bogus = format!("nar/{}.nar.zst", &sha256_nix32(b"other bytes")["sha256:".len()..]);
    garage.put(&bogus, &[7u8; 300_000]);
    let out = Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{size_download}"])
        .arg(format!("{}/{bogus}", fresh.url()))
        .output()
        .unwrap();
    assert!(!out.status.success(), "a copy with the wrong hash was served whole");
    assert!(String::from_utf8_lossy(&out.stdout).parse::<u64>().unwrap() < 300_000);
    assert_eq!(fresh.metric("hearth_bucket_read_cache_fill_failures_total"), 1.0);
    // The bucket away: a path not here is a 503 to retry, never a 404 or a 500; a local one is
    // served as ever.
    drop(garage);
    let away = through.get("/11111111111111111111111111111111.narinfo");
    assert_eq!(away.status, 503);
    assert_eq!(away.header("retry-after"), Some("5"));
    assert_eq!(through.get(&format!("/{}.narinfo", hash(&seed))).status, 200);
    // What it has just served it still serves: the narinfo it read, the NAR it copied.
    assert_eq!(through.get(&format!("/{}.narinfo", hash(big))).status, 200);
    let copied = through.get(&format!("/{big_url}"));
    assert_eq!(copied.status, 200);
    assert!(copied.body == want);
}

#[test]
fn a_hot_nar_is_compressed_once_for_serving_and_for_the_bucket() {
    let Rig { garage, nats, work, fleet } = Rig::start();
    let config = format!(
        "{}\n[compression]\nalgorithm = \"zstd\"\n\n[nar_cache]\ndir = \"{}\"\nmax_size = \"1GiB\"\n",
        pushing_config(&garage, &nats, work.path(), &fleet, "", ""),
        work.path().join("nars").display()
    );
    let hearth = common::builder::start(&config);
    let system = build(&nats)["out_path"].as_str().unwrap().to_owned();
    let closure = closure_of(&system);
    wait_in_bucket(&garage, &closure, "the closure is in the bucket");
    // The bucket's NAR of each path is the very file hearth serves hot: one compression each.
    for path in &closure {
        let pushed =
            NarInfo::parse(&String::from_utf8(garage.web(&format!("{}.narinfo", hash(path))).unwrap()).unwrap())
                .unwrap();
        let served = NarInfo::parse(&hearth.get(&format!("/{}.narinfo", hash(path))).text()).unwrap();
        assert!(served.file_hash.is_some(), "{path} is not hot");
        assert_eq!((pushed.file_hash, pushed.file_size), (served.file_hash, served.file_size), "{path}");
    }
    assert_eq!(hearth.metric("hearth_nar_cache_fills_total"), closure.len() as f64);
}

#[test]
fn a_hot_nar_damaged_in_place_is_never_uploaded_and_the_path_is_pushed_from_the_store() {
    let Rig { garage, nats, work, fleet } = Rig::start();
    let nars = work.path().join("nars");
    let config = format!(
        "{}\n[compression]\nalgorithm = \"zstd\"\n\n[nar_cache]\ndir = \"{}\"\nmax_size = \"1GiB\"\n",
        pushing_config(&garage, &nats, work.path(), &fleet, "", ""),
        nars.display()
    );
    let path = common::add_to_store("hot-then-damaged", &common::random_bytes(400_000));
    // Served twice, the path's NAR becomes hot.
    let hearth = common::builder::start(&config);
    let narinfo = hearth.get(&format!("/{}.narinfo", hash(&path))).text();
    let url = narinfo.lines().find_map(|l| l.strip_prefix("URL: ")).unwrap().to_owned();
    for _ in 0..2 {
        assert_eq!(hearth.get(&format!("/{url}")).status, 200);
    }
    wait_until("the NAR to be hot", Duration::from_secs(60), || hearth.metric("hearth_nar_cache_fills_total") == 1.0);
    drop(hearth);
    // Damaged in place: same size, one byte changed.
    let entry = std::fs::read_dir(&nars)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .max_by_key(|p| std::fs::metadata(p).unwrap().len())
        .expect("a hot entry");
    let mut bytes = std::fs::read(&entry).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&entry, &bytes).unwrap();

    let config_file = work.path().join("push.toml");
    let key = common::nix_wire().join("keys/test.sec");
    std::fs::write(&config_file, format!("sign_key_paths = [\"{}\"]\n{config}", key.display())).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_hearth"))
        .args(["bucket", "push", "--config"])
        .arg(&config_file)
        .arg(&path)
        .env("HEARTH_LOG", "info")
        .output()
        .unwrap();
    let (said, log) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{said}{log}");
    assert!(log.contains("dropping a damaged NAR cache entry"), "{log}");
    // What the bucket holds is what its narinfo says: its object hashes to its FileHash, and a
    // client gets the path whole and signed.
    let pushed =
        NarInfo::parse(&String::from_utf8(garage.web(&format!("{}.narinfo", hash(&path))).unwrap()).unwrap()).unwrap();
    let object = garage.web(&pushed.url).expect("the NAR object");
    assert_eq!(Some(sha256_nix32(&object)), pushed.file_hash, "the bucket's NAR is not what its narinfo names");
    substitute_and_verify(garage.get("GARAGE_WEB"), &path);
}

#[test]
fn no_narinfo_is_visible_before_the_narinfos_of_its_references() {
    let Rig { garage, nats, work, fleet } = Rig::start();
    let hearth = common::builder::start(&pushing_config(&garage, &nats, work.path(), &fleet, "", ""));
    let ended = std::sync::atomic::AtomicBool::new(false);
    let (seen, violations) = std::thread::scope(|scope| {
        // Watches the bucket as a client would, the whole time the push runs.
        let watcher = scope.spawn(|| {
            let (mut seen, mut violations) = (BTreeSet::new(), Vec::new());
            let mut names: Vec<String> = Vec::new();
            while !ended.load(std::sync::atomic::Ordering::SeqCst) {
                if names.is_empty() {
                    let fleet: Value = serde_json::from_str(&hearth.get("/fleet.json").text()).unwrap();
                    if let Some(out) = fleet["hosts"][0]["generations"][0]["path"].as_str() {
                        names = closure_of(out);
                    }
                    continue;
                }
                for path in &names {
                    let Some(text) = garage.web(&format!("{}.narinfo", hash(path))) else { continue };
                    seen.insert(path.clone());
                    let info = NarInfo::parse(&String::from_utf8_lossy(&text)).unwrap();
                    for r in info.references.iter().filter(|r| !path.ends_with(r.as_str())) {
                        if garage.web(&format!("{}.narinfo", hash(r))).is_none() {
                            violations.push(format!("{path} visible before its reference {r}"));
                        }
                    }
                }
            }
            (seen, violations)
        });
        let system = build(&nats)["out_path"].as_str().unwrap().to_owned();
        wait_in_bucket(&garage, &closure_of(&system), "the closure is in the bucket");
        ended.store(true, std::sync::atomic::Ordering::SeqCst);
        watcher.join().unwrap()
    });
    assert!(violations.is_empty(), "{violations:#?}");
    assert!(!seen.is_empty(), "the watcher saw no narinfo appear");
}

#[test]
fn gc_keeps_every_kept_generation_and_collects_a_dropped_one() {
    let Rig { garage, nats, work, fleet } = Rig::start();
    let body = pushing_config(&garage, &nats, work.path(), &fleet, "", "keep_generations = 2");
    let hearth = common::builder::start(&body);
    let mut systems = Vec::new();
    let original = std::fs::read_to_string(fleet.join("flake.nix")).unwrap();
    for round in 0..3 {
        // Each round a new system (its own toplevel), the packages shared.
        let text = original.replace("echo $deps > $out", &format!("echo {round} $deps > $out"));
        std::fs::write(fleet.join("flake.nix"), text).unwrap();
        common::flake::git(&fleet, &["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "next"]);
        let system = build(&nats)["out_path"].as_str().unwrap().to_owned();
        // Its whole closure in the bucket (then gc may run with no grace).
        wait_for_push(&hearth);
        systems.push(system);
    }
    let config = work.path().join("gc.toml");
    let key = common::nix_wire().join("keys/test.sec");
    std::fs::write(&config, format!("sign_key_paths = [\"{}\"]\n{body}", key.display())).unwrap();
    let gc_with = |more: &[&str]| gc_cli(&config, more);
    let gc = |dry: bool| gc_with(if dry { &["--dry-run"] } else { &[] });
    // gc's grace counts in whole seconds of the objects' write times: with `--grace 0s`, what
    // was written in the second gc starts is still recent. The three rounds may take less than
    // a second; gc runs once that second is over.
    let pushed_at = wait_for_push(&hearth)["at"].as_i64().unwrap();
    wait_until("the second of the last upload to end", Duration::from_secs(5), || {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64 > pushed_at
    });
    let said = gc(true);
    assert!(said.contains("would delete 1 narinfo(s) and 1 NAR(s)"), "{said}");
    // Each object it would delete is named.
    assert!(said.contains(&format!("would delete {}.narinfo\n", hash(&systems[0]))), "{said}");
    assert!(said.lines().any(|l| l.starts_with("would delete nar/") && l.ends_with(".nar.zst")), "{said}");
    assert!(garage.web(&format!("{}.narinfo", hash(&systems[0]))).is_some(), "a dry run deleted");
    let said = gc(false);
    assert!(said.contains("deleted 1 narinfo(s) and 1 NAR(s)"), "{said}");
    // The dropped generation is gone; both kept ones (and the packages they share) stay, and
    // the oldest kept one still substitutes.
    assert!(garage.web(&format!("{}.narinfo", hash(&systems[0]))).is_none());
    for kept in &systems[1..] {
        assert!(garage.web(&format!("{}.narinfo", hash(kept))).is_some(), "{kept} was collected");
    }
    substitute_and_verify(garage.get("GARAGE_WEB"), &systems[1]);
    // Again: nothing more to collect.
    assert!(gc(false).contains("deleted 0 narinfo(s) and 0 NAR(s)"));
    // Every builder's timer may run it: with `--once-per`, the bucket is collected once a period.
    let said = gc_with(&["--once-per", "1d"]);
    assert!(said.starts_with("nothing to do: the bucket was collected at"), "{said}");
    assert!(gc_with(&["--once-per", "0s"]).contains("deleted 0 narinfo(s)"));
}

/// Invariant (ARCHITECTURE.md, the gc lease): under any interleaving of `hearth bucket gc` and
/// pushes that adopt what the bucket holds, no path of a kept generation disappears.
#[test]
fn gc_racing_builds_that_adopt_old_systems_never_loses_a_kept_path() {
    const ROUNDS: usize = 8;
    let Rig { garage, nats, work, fleet } = Rig::start();
    let body = pushing_config(&garage, &nats, work.path(), &fleet, "", "keep_generations = 1");
    let hearth = common::builder::start(&body);
    let config = work.path().join("gc.toml");
    let key = common::nix_wire().join("keys/test.sec");
    std::fs::write(&config, format!("sign_key_paths = [\"{}\"]\n{body}", key.display())).unwrap();
    let original = std::fs::read_to_string(fleet.join("flake.nix")).unwrap();
    // Two systems, built in turn: each build's system is one the bucket held before and gc may
    // be deleting (keep_generations = 1 dropped it), so the push finds it there and adopts it.
    let variant = |round: usize| original.replace("echo $deps > $out", &format!("echo {} $deps > $out", round % 2));
    let build_round = |round: usize| {
        std::fs::write(fleet.join("flake.nix"), variant(round)).unwrap();
        common::flake::git(&fleet, &["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "next"]);
        let system = build(&nats)["out_path"].as_str().unwrap().to_owned();
        wait_for_push(&hearth);
        system
    };
    build_round(0);
    for round in 1..ROUNDS {
        let ended = std::sync::atomic::AtomicBool::new(false);
        let system = std::thread::scope(|scope| {
            // gc, again and again, with no grace, the whole time the build and its push run.
            scope.spawn(|| {
                while !ended.load(std::sync::atomic::Ordering::SeqCst) {
                    gc_cli(&config, &[]);
                }
            });
            let system = build_round(round);
            ended.store(true, std::sync::atomic::Ordering::SeqCst);
            system
        });
        // The kept generation (this round's system) is whole in the bucket.
        for path in closure_of(&system) {
            let text = garage.web(&format!("{}.narinfo", hash(&path)));
            let text = text.unwrap_or_else(|| panic!("round {round}: {path} of the kept system was collected"));
            let info = NarInfo::parse(&String::from_utf8_lossy(&text)).unwrap();
            assert!(garage.web(&info.url).is_some(), "round {round}: the NAR of {path} was collected");
        }
    }
    let fleet: Value = serde_json::from_str(&hearth.get("/fleet.json").text()).unwrap();
    let kept = fleet["hosts"][0]["generations"][0]["path"].as_str().unwrap().to_owned();
    substitute_and_verify(garage.get("GARAGE_WEB"), &kept);
}

#[test]
fn a_dead_garage_node_stops_nothing_and_a_killed_hearth_finishes_its_uploads_after_a_restart() {
    let Rig { garage, nats, work, fleet } = Rig::start();
    let body = pushing_config(&garage, &nats, work.path(), &fleet, "", "");
    let mut hearth = common::builder::start(&body);
    let first = build(&nats)["out_path"].as_str().unwrap().to_owned();
    // One node of three dies while the closure uploads: writes and reads still reach a quorum.
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/garage");
    let killed = Command::new("bash").arg(&script).arg("kill").arg(garage.dir.path()).arg("3").status().unwrap();
    assert!(killed.success());
    let first_closure = closure_of(&first);
    wait_in_bucket(&garage, &first_closure, "uploads go on with a node down");
    // A new system; hearth dies right after its build, its uploads perhaps half done (the test
    // cannot choose the moment; what it asserts holds at any).
    let text = std::fs::read_to_string(fleet.join("flake.nix")).unwrap();
    let text = text.replace("i=0; while [ $i -lt 20 ]", "i=0; while [ $i -lt 21 ]");
    std::fs::write(fleet.join("flake.nix"), text).unwrap();
    common::flake::git(&fleet, &["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "bigger"]);
    let system = build(&nats)["out_path"].as_str().unwrap().to_owned();
    hearth.child.kill().unwrap();
    hearth.child.wait().unwrap();
    let closure = closure_of(&system);
    // Whatever got there: no narinfo names a NAR the bucket lacks.
    let consistent = || {
        closure.iter().all(|p| match garage.web(&format!("{}.narinfo", hash(p))) {
            None => true,
            Some(text) => {
                let info = NarInfo::parse(&String::from_utf8_lossy(&text)).unwrap();
                garage.web(&info.url).is_some()
            }
        })
    };
    assert!(consistent(), "a narinfo is visible before its NAR");
    // Restarted, it finds what the bucket lacks of its newest systems and uploads it.
    let _hearth = common::builder::start(&body);
    wait_in_bucket(&garage, &closure, "the closure is in the bucket after the restart");
    assert!(consistent());
    // What a kill left of a multipart upload, cleared as docs/fleet.md says; nothing kept goes.
    garage.cli(&["bucket", "cleanup-incomplete-uploads", "--older-than", "1s", "hearth"]);
    assert!(consistent());
    substitute_and_verify(garage.get("GARAGE_WEB"), &system);

    // `hearth bucket push` uploads a path built elsewhere, as the builder would, and says so.
    let config = work.path().join("push.toml");
    let key = common::nix_wire().join("keys/test.sec");
    std::fs::write(&config, format!("sign_key_paths = [\"{}\"]\n{body}", key.display())).unwrap();
    let other = common::build_input_addressed("pushed-by-hand", &salt());
    let out = Command::new(env!("CARGO_BIN_EXE_hearth"))
        .args(["bucket", "push", "--config"])
        .arg(&config)
        .arg(&other)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{said}{}", String::from_utf8_lossy(&out.stderr));
    assert!(said.starts_with("pushed 1 of 1 path(s) (0 already there)"), "{said}");
    substitute_and_verify(garage.get("GARAGE_WEB"), &other);
}

#[test]
fn a_bucket_narinfo_is_served_only_as_this_cache_can_serve_it() {
    let garage = Garage::start();
    let local = tempfile::tempdir().unwrap();
    let seed = common::add_to_store("read-through-seed", salt().as_bytes());
    run_ok(nix_cmd("nix").args(["copy", "--to", &format!("local?root={}", local.path().display()), &seed]));
    let through = cache_only(local.path(), &garage, "");
    let nar_hash = "sha256:1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s";
    let file = "0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73";
    let narinfo = |hash: &str, url: &str, extra: &str| {
        format!(
            "StorePath: /nix/store/{hash}-evil\nURL: {url}\nCompression: zstd\nNarHash: {nar_hash}\nNarSize: 100\nReferences: \n{extra}"
        )
    };
    let served = |hash: &str| through.get(&format!("/{hash}.narinfo"));
    let h = |c: char| std::iter::repeat_n(c, 32).collect::<String>();

    // An absolute URL (not covered by any signature) would send a client to another host.
    garage.put(
        &format!("{}.narinfo", h('a')),
        narinfo(&h('a'), &format!("http://127.0.0.2/nar/{file}.nar.zst"), "").as_bytes(),
    );
    // Another path's narinfo under this path's key.
    garage.put(&format!("{}.narinfo", h('b')), narinfo(&h('c'), &format!("nar/{file}.nar.zst"), "").as_bytes());
    // A URL that climbs out, one that names a store path's NAR, one whose Compression lies.
    garage.put(&format!("{}.narinfo", h('d')), narinfo(&h('d'), "nar/../../etc/passwd", "").as_bytes());
    garage.put(&format!("{}.narinfo", h('f')), narinfo(&h('f'), &format!("nar/{file}.nar"), "").as_bytes());
    // Larger than any narinfo: never read whole.
    let huge = narinfo(&h('g'), &format!("nar/{file}.nar.zst"), &format!("Deriver: {}\n", "x".repeat(2 << 20)));
    garage.put(&format!("{}.narinfo", h('g')), huge.as_bytes());
    // Past the narinfo bound (512 KiB) though under the bound of a record entry.
    let big = narinfo(&h('k'), &format!("nar/{file}.nar.zst"), &format!("Deriver: {}\n", "x".repeat(600 << 10)));
    garage.put(&format!("{}.narinfo", h('k')), big.as_bytes());
    // Malformed.
    garage.put(&format!("{}.narinfo", h('i')), b"StorePath: nowhere\n\xff\xfe");
    for c in ['a', 'b', 'd', 'f', 'g', 'k', 'i'] {
        assert_eq!(served(&h(c)).status, 404, "the bucket's narinfo {c} was served");
    }
    through.wait_for_log("is not one this cache serves", 7);

    // A good one is served with only the fields hearth knows, its signature untouched.
    let good = narinfo(&h('j'), &format!("nar/{file}.nar.zst"), "Sig: k-1:c2lnbmF0dXJl\nX-Track: me\n");
    garage.put(&format!("{}.narinfo", h('j')), good.as_bytes());
    let r = served(&h('j'));
    assert_eq!(r.status, 200);
    let text = r.text();
    assert!(!text.contains("X-Track"), "an unknown field was passed on:\n{text}");
    assert!(text.contains("Sig: k-1:c2lnbmF0dXJl\n") && text.contains(&format!("URL: nar/{file}.nar.zst\n")), "{text}");
    assert_eq!(through.get("/nix-cache-info").status, 200);
}

/// An S3 endpoint that accepts connections and never answers one.
struct SilentBucket {
    port: u16,
    conns: std::sync::Arc<std::sync::Mutex<Vec<std::net::TcpStream>>>,
}

impl SilentBucket {
    fn start() -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let conns = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let kept = conns.clone();
        std::thread::spawn(move || {
            for s in listener.incoming().flatten() {
                kept.lock().unwrap().push(s);
            }
        });
        SilentBucket { port, conns }
    }

    /// Whether a client gave up on (closed) a connection: what it sent is read and dropped, and
    /// a read of 0 bytes is its close.
    fn any_closed(&self) -> bool {
        use std::io::Read;
        self.conns.lock().unwrap().iter_mut().any(|s| {
            s.set_nonblocking(true).unwrap();
            let mut buf = [0u8; 4096];
            loop {
                match s.read(&mut buf) {
                    Ok(0) => return true,
                    Ok(_) => continue,
                    Err(_) => return false,
                }
            }
        })
    }

    fn accepted(&self) -> usize {
        self.conns.lock().unwrap().len()
    }
}

/// A builder of `fleet` whose bucket is at `endpoint` (never a Garage: one that does not answer).
fn builder_with_bucket_at(nats: &Nats, work: &Path, fleet: &Path, endpoint: &str) -> Hearth {
    for f in ["id", "secret"] {
        std::fs::write(work.join(f), "x").unwrap();
    }
    BuilderToml::new(nats, &work.join("gcroots"))
        .top(&format!(
            "state_dir = \"{w}/state\"\n[bucket]\nurl = \"s3://hearth?endpoint={endpoint}&region=garage\"\naccess_key_id_file = \"{w}/id\"\nsecret_access_key_file = \"{w}/secret\"",
            w = work.display()
        ))
        .repo("fleet", &format!("git+file://{}", fleet.display()))
        .start()
}

#[test]
fn a_bucket_that_never_answers_never_holds_a_builds_reply() {
    let silent = SilentBucket::start();
    let nats = Nats::start();
    let work = tempfile::tempdir().unwrap();
    let fleet = repo(work.path());
    let hearth = builder_with_bucket_at(&nats, work.path(), &fleet, &format!("http://127.0.0.1:{}", silent.port));
    let reply = build(&nats);
    assert_eq!(reply["status"], "completed", "{reply}");
    // Every request to the bucket is still waiting for an answer that never comes: the reply
    // waited for none of them to give up.
    assert!(!silent.any_closed(), "the reply came only after a bucket request gave up");
    // The push was made all the same, in the background.
    wait_until("the push to ask the bucket", Duration::from_secs(60), || silent.accepted() >= 1);
    let fleet: Value = serde_json::from_str(&hearth.get("/fleet.json").text()).unwrap();
    assert!(fleet["hosts"][0]["bucket"]["queued"].as_u64() > Some(0), "{fleet}");
}

#[test]
fn an_unreachable_bucket_is_noticed_once_and_its_paths_wait_for_a_later_build() {
    // A port nothing listens on: every connection is refused.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let nats = Nats::start();
    let work = tempfile::tempdir().unwrap();
    let fleet = repo(work.path());
    let hearth = builder_with_bucket_at(&nats, work.path(), &fleet, &format!("http://127.0.0.1:{port}"));
    let system = build(&nats)["out_path"].as_str().unwrap().to_owned();
    let closure = closure_of(&system).len() as u64;
    let mut last = Value::Null;
    wait_until("the push to end", Duration::from_secs(120), || {
        let fleet: Value = serde_json::from_str(&hearth.get("/fleet.json").text()).unwrap();
        last = fleet["hosts"][0]["bucket"].clone();
        last["queued"].as_u64() == Some(0)
    });
    assert_eq!((last["failed"].as_u64(), last["total"].as_u64()), (Some(closure), Some(closure)), "{last}");
    // Said once, however many paths: not a timeout per path.
    assert_eq!(hearth.log().matches("the bucket does not answer").count(), 1, "{}", hearth.log());
    assert_eq!(hearth.log().matches("upload failed").count(), 0, "paths were tried one by one:\n{}", hearth.log());
}

#[test]
fn a_builder_with_a_wrong_secret_never_rewrites_what_the_bucket_holds() {
    let Rig { garage, nats, work, fleet } = Rig::start();
    let body = pushing_config(&garage, &nats, work.path(), &fleet, "", "");
    let mut hearth = common::builder::start(&body);
    build(&nats);
    let pushed = wait_for_push(&hearth);
    assert_eq!(pushed["present"], pushed["total"], "{pushed}");
    hearth.terminate();
    // Started again with a wrong secret, it checks its newest system's closure and fails.
    let wrong = work.path().join("wrong-secret");
    std::fs::write(&wrong, "0000000000000000000000000000000000000000000000000000000000000000\n").unwrap();
    let secret = garage.get("GARAGE_SECRET_ACCESS_KEY_FILE");
    let body = body.replace(secret, &wrong.display().to_string());
    assert!(body.contains("wrong-secret"));
    let broken = common::builder::start(&body);
    broken.wait_for_log("pushed the system to the bucket", 1);
    assert!(broken.log().contains("failed=") && !broken.log().contains("failed=0"), "{}", broken.log());
    // What the bucket holds is still what the record says.
    let fleet: Value = serde_json::from_str(&broken.get("/fleet.json").text()).unwrap();
    let copy = &fleet["hosts"][0]["bucket"];
    assert_eq!((copy["present"].clone(), copy["failed"].as_u64()), (pushed["total"].clone(), Some(0)), "{copy}");
}

/// #31.11: a multipart upload a crash cut short leaves its parts (S3 keeps them, no listing of
/// objects shows them); its journal entry has the next start abort it.
#[test]
fn a_multipart_upload_a_crash_left_is_aborted_at_the_next_start() {
    let Rig { garage, nats, work, fleet } = Rig::start();
    // What a killed hearth leaves: an upload begun, its journal entry beside it.
    let began = garage.s3("POST", "nar/left-behind.nar.zst?uploads=");
    let id = began.split("<UploadId>").nth(1).and_then(|r| r.split("</UploadId>").next()).unwrap().to_owned();
    assert!(garage.s3("GET", "?uploads=").contains(&id), "no upload to leave behind");
    let journal = work.path().join("state/multipart");
    std::fs::create_dir_all(&journal).unwrap();
    let entry = serde_json::json!({ "key": "nar/left-behind.nar.zst", "id": id });
    std::fs::write(journal.join("cut"), entry.to_string()).unwrap();
    let hearth = common::builder::start(&pushing_config(&garage, &nats, work.path(), &fleet, "", ""));
    hearth.wait_for_log("aborted multipart uploads a stop left behind", 1);
    let gone = || !garage.s3("GET", "?uploads=").contains(&id);
    common::wait_until_or("the upload left behind to be gone", Duration::from_secs(30), gone, || hearth.log());
    assert_eq!(std::fs::read_dir(&journal).unwrap().count(), 0);
    // Uploads in parts still work, and leave no journal entry.
    build(&nats);
    assert_eq!(wait_for_push(&hearth)["failed"], 0);
    assert_eq!(std::fs::read_dir(&journal).unwrap().count(), 0);
}
