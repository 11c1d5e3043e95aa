//! Several builders as one fleet, as two machines are: builder A on this machine's Nix and
//! store, builder B inside `scripts/peers`' root (its own `/nix`, today's Nix), sharing one
//! nats-server (JetStream) and one Garage over loopback; and a read-through hearth with a store
//! of its own that shows the fleet with `[fleet]`. Each builder signs with its own key.
//!
//! What one fleet means here: a client that trusts the keys any page prints substitutes every
//! host from every hearth; every page names both builders; a host's history is one, whichever
//! builder (and store) built its systems.
//!
//! The test runs B through `scripts/peers`, so it cannot run inside that root: it is ignored
//! there (`scripts/test --peers` lists it as such) and `scripts/test` runs it on the host.

#![allow(clippy::unwrap_used)] // Test code: a panic is a failed test.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::builder::BuilderToml;
use common::flake::{git, make_repo, salt, system};
use common::garage::Garage;
use common::nats::Nats;
use common::{Hearth, nix_cmd, run_ok, wait_until};
use serde_json::Value;

/// A directory both stores' builders see at the same path (the checkout is mounted into the
/// peers root; the test's own /tmp is not).
fn shared_dir() -> tempfile::TempDir {
    let dir = tempfile::Builder::new().prefix("fleet-").tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    common::set_mode(dir.path(), 0o755);
    dir
}

/// Copies `file` into `dir` (readable by the builders), returning the copy.
fn copy_into(dir: &Path, file: &str, name: &str) -> PathBuf {
    let to = dir.join(name);
    std::fs::copy(file, &to).unwrap();
    common::set_mode(&to, 0o600);
    to
}

/// Two gated hosts, each a system over a library of its own: `version` is the libraries'.
fn flake_text(gate: &Path, version: &str, salt: &str) -> String {
    let g = gate.display();
    format!(
        r#"{{
  outputs = {{ self }}:
    let
      drv = name: script: deps: derivation {{ inherit name deps; system = "{sys}"; builder = "/bin/sh"; args = [ "-c" script ]; }};
      host = name: let lib = drv "lib${{name}}-{version}" "echo ${{name}} {version} {salt} > $out" [ ]; in {{
        config.system.build.toplevel = drv "nixos-system-${{name}}-{salt}"
          "while [ ! -e {g}/release ]; do /bin/sleep 0.05; done; echo $deps > $out" [ lib ];
      }};
    in {{
      nixosConfigurations = {{ web1 = host "web1"; db1 = host "db1"; }};
    }};
}}
"#,
        sys = system()
    )
}

/// The `[bucket]` lines for `garage`, its credentials (`role`: `ACCESS` or `READER`, the key
/// that may only read) copied into `dir`; reading through.
fn bucket_lines(garage: &Garage, dir: &Path, role: &str) -> String {
    let (id, secret) = match role {
        "READER" => ("GARAGE_READER_KEY_ID_FILE", "GARAGE_READER_SECRET_KEY_FILE"),
        _ => ("GARAGE_ACCESS_KEY_ID_FILE", "GARAGE_SECRET_ACCESS_KEY_FILE"),
    };
    let id = copy_into(dir, garage.get(id), &format!("s3-{role}-id"));
    let secret = copy_into(dir, garage.get(secret), &format!("s3-{role}-secret"));
    format!(
        "[bucket]\nurl = \"s3://{}?endpoint={}&region={}\"\naccess_key_id_file = \"{}\"\nsecret_access_key_file = \"{}\"\nread_through = true\n",
        garage.get("GARAGE_BUCKET"),
        garage.get("GARAGE_S3"),
        garage.get("GARAGE_REGION"),
        id.display(),
        secret.display()
    )
}

/// Builder B's hearth, run inside the peers root with its own nix-daemon and store.
fn builder_in_peers(dir: &Path, nats: &Nats, bucket: &str, repo: &str) -> Hearth {
    let key = dir.join("b.sec");
    run_ok(
        Command::new(env!("CARGO_BIN_EXE_hearth"))
            .args(["keygen", "builder-b-1", "--secret-key-file"])
            .arg(&key)
            .arg("--public-key-file")
            .arg(dir.join("b.pub")),
    );
    let seed = copy_into(dir, &nats.builder_seed.display().to_string(), "builder.seed");
    let config = dir.join("b.toml");
    std::fs::write(
        &config,
        format!(
            "bind = \"127.0.0.1:0\"\nsign_key_paths = [\"{key}\"]\nstate_dir = \"{state}\"\n{bucket}\n[builder]\nnats_url = \"{url}\"\nnkey_seed_file = \"{seed}\"\ngcroots_dir = \"{roots}\"\nqueue = \"jetstream\"\nname = \"builder-b\"\n\n[[builder.repos]]\nname = \"fleet\"\nurl = \"{repo}\"\n",
            key = key.display(),
            state = dir.join("b-state").display(),
            url = nats.url(),
            seed = seed.display(),
            roots = dir.join("b-roots").display(),
        ),
    )
    .unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/peers");
    let mut cmd = Command::new("bash");
    cmd.arg(script).args([
        "bash",
        "-c",
        ". scripts/lib.sh; ensure_nix_daemon >&2; export HEARTH_LOG=info,hearth=debug NO_COLOR=1 NIX_CONFIG='substituters ='; exec \"$0\" serve --config \"$1\"",
        env!("CARGO_BIN_EXE_hearth"),
    ]);
    cmd.arg(&config);
    let hearth = Hearth::spawn_command(cmd, tempfile::tempdir().unwrap());
    hearth.wait_builder_ready();
    hearth
}

/// The fleet page's JSON of `h`.
fn fleet_of(h: &Hearth) -> Value {
    serde_json::from_slice(&h.get("/fleet.json").body).unwrap()
}

/// The record of `host` as `h`'s page shows it.
fn host_on(h: &Hearth, host: &str) -> Value {
    fleet_of(h)["hosts"].as_array().unwrap().iter().find(|x| x["host"] == host).cloned().unwrap_or(Value::Null)
}

/// `hearth build fleet <target>` as a deployer: its final reply.
fn build(nats: &Nats, target: &str) -> Value {
    build_in_background(nats, target).join().unwrap()
}

/// The same, on a thread of its own (the test goes on while the build waits at the gate).
fn build_in_background(nats: &Nats, target: &str) -> std::thread::JoinHandle<Value> {
    let (url, seed, target) = (nats.url(), nats.seed_path().to_owned(), target.to_owned());
    std::thread::spawn(move || {
        let out = Command::new(env!("CARGO_BIN_EXE_hearth"))
            .args(["build", "fleet", &target, "--json", "--nats-url", &url, "--nkey-seed-file"])
            .arg(seed)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(0), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_str(stdout.lines().last().unwrap()).unwrap()
    })
}

/// Substitutes `system` from `from` into a fresh store trusting only `keys`, and verifies it.
fn substitutes(from: &str, system: &str, keys: &str) {
    let dest = tempfile::tempdir().unwrap();
    let store = format!("local?root={}", dest.path().display());
    let copied = nix_cmd("nix")
        .args(["copy", "--from", from, "--to", &store, "--option", "trusted-public-keys", keys, system])
        .output()
        .unwrap();
    assert!(copied.status.success(), "nix copy --from {from} {system}: {}", String::from_utf8_lossy(&copied.stderr));
    let verified = nix_cmd("nix")
        .args(["store", "verify", "--store", &store, "--option", "trusted-public-keys", keys, "-r", system])
        .output()
        .unwrap();
    assert!(verified.status.success(), "{}", String::from_utf8_lossy(&verified.stderr));
}

#[test]
#[ignore = "runs builder B through scripts/peers, so not inside that root: scripts/test runs it on the host"]
fn two_builders_with_separate_stores_and_a_read_through_cache_are_one_fleet() {
    let garage = Garage::start();
    let nats = Nats::start_jetstream();
    let dir = shared_dir();
    let gate = dir.path().join("gate");
    std::fs::create_dir_all(&gate).unwrap();
    common::set_mode(&gate, 0o777);
    let s = salt();
    let repo = dir.path().join("fleet");
    make_repo(&repo, &flake_text(&gate, "1.0", &s));
    let url = format!("git+file://{}", repo.display());
    let bucket = bucket_lines(&garage, dir.path(), "ACCESS");

    let a = BuilderToml::new(&nats, &dir.path().join("a-roots"))
        .top(&bucket)
        .with("queue = \"jetstream\"\nname = \"builder-a\"")
        .repo("fleet", &url)
        .start();
    let b = builder_in_peers(dir.path(), &nats, &bucket, &url);
    // The read-through cache: a store of its own, no key, the bucket's key that may only read,
    // the fleet shown through `[fleet]`.
    let bucket = bucket_lines(&garage, dir.path(), "READER");
    let local = tempfile::tempdir().unwrap();
    let seed = common::add_to_store("fleet-seed", s.as_bytes());
    run_ok(nix_cmd("nix").args(["copy", "--to", &format!("local?root={}", local.path().display()), &seed]));
    let cache_dir = tempfile::tempdir().unwrap();
    let cache_config = cache_dir.path().join("hearth.toml");
    std::fs::write(
        &cache_config,
        format!(
            "bind = \"127.0.0.1:0\"\nstate_dir = \"{state}\"\n[store]\nbackend = \"db\"\ndb_path = \"{root}/nix/var/nix/db/db.sqlite\"\nreal_dir = \"{root}/nix/store\"\n\n{bucket}\n[fleet]\nnats_url = \"{nats}\"\nnkey_seed_file = \"{reader}\"\n",
            state = cache_dir.path().join("state").display(),
            root = local.path().display(),
            nats = nats.url(),
            reader = nats.reader_seed.display(),
        ),
    )
    .unwrap();
    let cache = Hearth::start_with_config(&cache_config, cache_dir);

    // Each builder takes one host while the other waits at the gate.
    let db1 = build_in_background(&nats, "db1");
    wait_until("a builder takes db1", Duration::from_secs(120), || {
        a.log().contains("build started") || b.log().contains("build started")
    });
    let web1 = build_in_background(&nats, "web1");
    wait_until("both builders build", Duration::from_secs(120), || {
        a.log().contains("build started") && b.log().contains("build started")
    });
    std::fs::write(gate.join("release"), "").unwrap();
    let finals: Vec<Value> = [db1, web1].into_iter().map(|t| t.join().unwrap()).collect();
    for f in &finals {
        assert_eq!(f["status"], "completed", "{f}");
    }
    let systems: Vec<(String, String)> = finals
        .iter()
        .map(|f| (f["host"].as_str().unwrap().to_owned(), f["out_path"].as_str().unwrap().to_owned()))
        .collect();

    // One picture: every page names both builders and the same two keys; the read-through
    // cache shows the record and each push's end.
    let keys_of = |h: &Hearth| -> Vec<String> {
        let mut k: Vec<String> = fleet_of(h)["trusted_public_keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k.as_str().unwrap().to_owned())
            .collect();
        k.sort();
        k
    };
    wait_until("every page shows both builders and both pushes", Duration::from_secs(120), || {
        [&a, &b, &cache].iter().all(|h| {
            let f = fleet_of(h);
            let builders = f["builders"].as_array().map_or(0, |b| b.iter().filter(|b| b["alive"] == true).count());
            let pushed = ["web1", "db1"].iter().all(|host| {
                let copy = &host_on(h, host)["bucket"];
                copy["queued"] == 0 && copy["present"] == copy["total"]
            });
            builders == 2 && keys_of(h).len() == 2 && pushed
        })
    });
    assert_eq!(keys_of(&a), keys_of(&cache));
    assert_eq!(keys_of(&b), keys_of(&cache));
    // `check-config` and the log of the cache (which has no key of its own) name them too.
    let checked =
        run_ok(Command::new(env!("CARGO_BIN_EXE_hearth")).args(["check-config", "--config"]).arg(&cache_config));
    let line = checked.lines().find(|l| l.starts_with("clients of the fleet trust: trusted-public-keys = ")).unwrap();
    for key in keys_of(&cache) {
        assert!(line.contains(&key), "{checked}");
        assert!(cache.log().contains(&key), "{}", cache.log());
    }
    let page = cache.get("/").text();
    assert!(
        page.contains("it shows the fleet&#39;s shared record") || page.contains("it shows the fleet's shared record"),
        "{page}"
    );
    assert!(page.contains("builder-a") && page.contains("builder-b"), "{page}");
    let built_by: Vec<String> = ["db1", "web1"]
        .iter()
        .map(|h| host_on(&cache, h)["generations"][0]["builder"].as_str().unwrap().to_owned())
        .collect();
    assert!(built_by.contains(&"builder-a".to_owned()) && built_by.contains(&"builder-b".to_owned()), "{built_by:?}");
    // Two machines: what B built is not in this machine's store (B's Nix is the root's own).
    for (host, system) in &systems {
        let here = nix_cmd("nix-store")
            .args(["--check-validity", system])
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap()
            .success();
        let by_b = host_on(&cache, host)["generations"][0]["builder"] == "builder-b";
        assert_eq!(here, !by_b, "{host}: {system}");
    }
    assert!(b.log().contains("nix_version=2.3") || b.log().contains("(Nix) 2.3"), "{}", b.log());

    // One trust root: trusting the keys the read-through page prints, every host substitutes
    // from every hearth (a host's paths are in one builder's store and in the bucket).
    let trusted = keys_of(&cache).join(" ");
    for h in [&a, &b, &cache] {
        for (_, system) in &systems {
            substitutes(&h.url(), system, &trusted);
        }
    }

    // One history: the host B built, built again by A (B is gone), is compared with B's system,
    // read from the bucket (A's store never held it).
    let (host_of_b, _) = systems
        .iter()
        .find(|(host, _)| host_on(&cache, host)["generations"][0]["builder"] == "builder-b")
        .cloned()
        .unwrap();
    drop(b);
    std::fs::write(repo.join("flake.nix"), flake_text(&gate, "2.0", &s)).unwrap();
    git(&repo, &["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "libraries 2.0"]);
    let again = build(&nats, &host_of_b);
    assert_eq!(again["status"], "completed", "{again}");
    let record = host_on(&a, &host_of_b);
    let numbers: Vec<(u64, &str)> = record["generations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| (g["number"].as_u64().unwrap(), g["builder"].as_str().unwrap()))
        .collect();
    assert_eq!(numbers, [(1, "builder-b"), (2, "builder-a")], "{record:#}");
    let changes = &record["changes"];
    assert!(changes["first_build"].is_null() && changes["paths_before"] == 2, "{record:#}");
    assert!(changes.to_string().contains("1.0") && changes.to_string().contains("2.0"), "{changes}");
}
