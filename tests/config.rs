//! Configuration and key handling: every error names the file and key, exits 2, and never
//! prints key material; `hearth keygen` writes a pair that Nix's format accepts.

#![allow(clippy::unwrap_used)] // Test code: a panic is a failed test.

mod common;

use std::process::{Command, Output};

use hearth::config::FileConfig;
use hearth::nix::signing::{PublicKey, SecretKey};

fn hearth(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_hearth")).args(args).output().unwrap()
}

fn check(toml: &str) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, toml).unwrap();
    let out = hearth(&["check-config", "--config", path.to_str().unwrap()]);
    (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn the_example_config_has_only_known_keys() {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/hearth.toml")).unwrap();
    let parsed: FileConfig = toml::from_str(&text).unwrap();
    assert_eq!(parsed.priority, 30);
    // Every key at its default, and the example parses as a whole config would.
    assert_eq!(parsed.max_nar_streams, FileConfig::default().max_nar_streams);
    assert_eq!(parsed.nar_cache.unwrap().max_size, "20GiB");
    assert_eq!(parsed.builder.unwrap().repos.len(), 1);
}

#[test]
fn an_empty_config_is_valid() {
    assert_eq!(check("").0, Some(0));
}

#[test]
fn check_config_says_what_it_checked_and_no_secret() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hearth.toml");
    let key = common::nix_wire().join("keys/test.sec");
    std::fs::write(
        &path,
        format!(
            "sign_key_paths = [\"{}\"]\n[metrics]\nbind = \"0.0.0.0:9973\"\n[builder]\nnats_url = \"nats://127.0.0.1:4222\"\n[[builder.repos]]\nname = \"fleet\"\nurl = \"git+https://bot:hunter2@example.org/fleet.git\"\n",
            key.display()
        ),
    )
    .unwrap();
    let out = hearth(&["check-config", "--config", path.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    for needle in [
        "cache listens on 127.0.0.1:5000",
        "metrics listen on 0.0.0.0:9973",
        "signing key test-cache-1 (trusted-public-keys = test-cache-1:",
        "repo fleet: git+https://example.org/fleet.git (deploy branch master)",
        "configuration OK",
    ] {
        assert!(text.contains(needle), "no `{needle}` in\n{text}");
    }
    assert!(!text.contains("hunter2"), "{text}");
}

#[test]
fn keygen_makes_the_directory_the_quick_start_names() {
    let dir = tempfile::tempdir().unwrap();
    let sec = dir.path().join("var/lib/hearth/secret.key");
    let out = hearth(
        &["keygen", "c-1", "--secret-key-file", sec.to_str().unwrap(), "--public-key-file"]
            .iter()
            .copied()
            .chain([dir.path().join("var/lib/hearth/public.key").to_str().unwrap()])
            .collect::<Vec<_>>(),
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(sec.parent().unwrap()).unwrap().permissions().mode() & 0o777, 0o700);
}

#[test]
fn bad_configs_fail_naming_file_key_and_reason() {
    let cases = [
        ("colour = \"blue\"\n", "colour"),
        ("priority = \"high\"\n", "priority"),
        ("bind = \"nowhere\"\n", "bind"),
        ("bind = \"unix:relative.sock\"\n", "bind"),
        ("daemon_pool_size = 0\n", "daemon_pool_size"),
        ("[compression]\nalgorithm = \"brotli\"\n", "brotli"),
        ("[compression]\nlevel = 40\n", "compression.level"),
        ("[store]\nbackend = \"carrier-pigeon\"\n", "backend"),
        ("store_dir = \"nix/store\"\n", "store_dir"),
        ("[builder]\nrepos = []\n", "builder.repos"),
        ("[builder]\n[[builder.repos]]\nname = \"a b\"\nurl = \"git+file:///r\"\n", "builder.repos.name"),
        (
            "[builder]\n[[builder.repos]]\nname = \"r\"\nurl = \"git+file:///r\"\nbranch = \"-x\"\n",
            "builder.repos.branch",
        ),
        ("[builder]\nbogus = 1\n[[builder.repos]]\nname = \"r\"\nurl = \"u\"\n", "bogus"),
        ("state_dir = \"state\"\n", "state_dir"),
        ("[builder]\ngcroots_dir = \"roots\"\n[[builder.repos]]\nname = \"r\"\nurl = \"u\"\n", "builder.gcroots_dir"),
        ("[nar_cache]\ndir = \"/etc/passwd\"\n", "nar_cache.dir"),
        ("[nar_cache]\ndir = \"/var/cache/x\"\nmax_size = \"20 gigs\"\n", "nar_cache.max_size"),
        ("trusted_proxies = [\"nginx\"]\n", "trusted_proxies"),
        ("client_stream_share = 0.0\n", "client_stream_share"),
    ];
    for (toml, needle) in cases {
        let (code, err) = check(toml);
        assert_eq!(code, Some(2), "{toml}: {err}");
        assert!(err.contains(needle), "{toml}: `{err}` does not name {needle}");
    }
    // Numbers that would break the server at run time are refused up front.
    for (toml, needle) in [
        ("max_connections = 2305843009213693952\n", "max_connections"),
        ("header_timeout_seconds = 9223372036854775807\n", "header_timeout_seconds"),
        ("send_timeout_seconds = 0\n", "send_timeout_seconds"),
        ("max_nar_streams = 0\n", "max_nar_streams"),
        ("nar_threads = 100000\n", "nar_threads"),
        ("[compression]\nmax_streams = 0\n", "compression.max_streams"),
        ("shutdown_grace_seconds = 99999999\n", "shutdown_grace_seconds"),
        ("[builder]\nqueue_size = 99999999\n[[builder.repos]]\nname = \"r\"\nurl = \"u\"\n", "builder.queue_size"),
        ("[builder]\neval_workers = 0\n[[builder.repos]]\nname = \"r\"\nurl = \"u\"\n", "builder.eval_workers"),
        (
            "[builder]\nheartbeat_seconds = 60\n[[builder.repos]]\nname = \"r\"\nurl = \"u\"\n",
            "builder.heartbeat_seconds",
        ),
        (
            "[builder]\nqueue = \"jetstream\"\n[builder.jetstream]\nack_wait_seconds = 1\n[[builder.repos]]\nname = \"r\"\nurl = \"u\"\n",
            "builder.jetstream.ack_wait_seconds",
        ),
    ] {
        let (code, err) = check(toml);
        assert_eq!(code, Some(2), "{toml}: {err}");
        assert!(err.contains(needle) && err.contains("out of range"), "{toml}: {err}");
    }
    // A stream, consumer or bucket name that NATS would refuse is refused here, by its key.
    for (toml, needle) in [
        ("[builder.jetstream]\nstream = \"a.b\"\n", "builder.jetstream.stream"),
        ("[builder.jetstream]\nbucket = \"x y\"\n", "builder.jetstream.bucket"),
        ("queue = \"kafka\"\n", "queue"),
    ] {
        let (code, err) = check(&format!("[builder]\n{toml}[[builder.repos]]\nname = \"r\"\nurl = \"u\"\n"));
        assert_eq!(code, Some(2), "{toml}: {err}");
        assert!(err.contains(needle), "{toml}: {err}");
    }
    // The documented maximum is accepted.
    let (code, err) = check("[nar_cache]\ndir = \"/var/cache/hearth-test-nars\"\nmax_size = \"1PiB\"\n");
    assert_eq!(code, Some(0), "{err}");
    let (code, err) = check("priority = 30\nunknown_key = 1\n");
    assert_eq!(code, Some(2));
    assert!(err.contains("bad.toml"), "the error does not name the file: {err}");
}

#[test]
fn key_file_errors_name_the_file_and_never_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.sec");
    let (code, err) = check(&format!("sign_key_paths = [\"{}\"]\n", missing.display()));
    assert_eq!(code, Some(2));
    assert!(err.contains("missing.sec"), "{err}");

    // The right length but a public half that does not match: malformed, and not echoed.
    let bad = dir.path().join("bad.sec");
    let secret = "k-1:AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQ==";
    std::fs::write(&bad, secret).unwrap();
    let (code, err) = check(&format!("sign_key_paths = [\"{}\"]\n", bad.display()));
    assert_eq!(code, Some(2));
    assert!(err.contains("bad.sec") && err.contains("not a Nix secret key"), "{err}");
    assert!(!err.contains("AQEBAQEB"), "key material in the error: {err}");
}

#[test]
fn a_secret_given_as_the_config_is_never_echoed() {
    let secret = std::fs::read_to_string(common::nix_wire().join("keys/test.sec")).unwrap();
    let seed = nkeys::KeyPair::new_user().seed().unwrap();
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in [("cache.sec", secret.trim().to_owned()), ("nats.seed", seed.clone())] {
        let path = dir.path().join(name);
        std::fs::write(&path, &text).unwrap();
        let out = hearth(&["check-config", "--config", path.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(err.contains(name), "the file is not named: {err}");
        let tail = &text[text.len() - 16..];
        assert!(!err.contains(tail) && !err.contains(&text[..12.min(text.len())]), "secret echoed: {err}");
    }
}

#[test]
fn a_fifo_as_a_key_or_config_fails_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("key.fifo");
    assert!(Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    // Nobody writes to the FIFO: opening it for reading would block forever.
    let (code, err) = check(&format!("sign_key_paths = [\"{}\"]\n", fifo.display()));
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("not a regular file"), "{err}");
    let out = hearth(&["check-config", "--config", fifo.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn keygen_writes_a_private_nix_format_pair_and_never_overwrites() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let sec = dir.path().join("k.sec");
    let public = dir.path().join("k.pub");
    let out = hearth(&[
        "keygen",
        "cache.example.org-1",
        "--secret-key-file",
        sec.to_str().unwrap(),
        "--public-key-file",
        public.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(std::fs::metadata(&sec).unwrap().permissions().mode() & 0o777, 0o600);
    let key = SecretKey::parse(&std::fs::read_to_string(&sec).unwrap()).unwrap();
    let pk = PublicKey::parse(&std::fs::read_to_string(&public).unwrap()).unwrap();
    assert_eq!(pk.name(), "cache.example.org-1");
    assert!(pk.verify("1;/nix/store/x;sha256:y;1;", &key.sign("1;/nix/store/x;sha256:y;1;")));
    let before = std::fs::read(&sec).unwrap();
    let again = hearth(&[
        "keygen",
        "other-1",
        "--secret-key-file",
        sec.to_str().unwrap(),
        "--public-key-file",
        public.to_str().unwrap(),
    ]);
    assert!(!again.status.success());
    assert_eq!(std::fs::read(&sec).unwrap(), before, "keygen overwrote a secret key");
    // Nix itself signs with the generated key, and the signature verifies with our public key.
    common::ensure_store();
    let store = dir.path().join("store");
    let path = "/nix/store/2xr781z591fm9c9jchvf8389sr8qsszk-hello.txt";
    common::run_ok(common::nix_cmd("nix").args(["copy", "--to"]).arg(&store).arg(path));
    common::run_ok(
        common::nix_cmd("nix").args(["store", "sign", "--store"]).arg(&store).arg("--key-file").arg(&sec).arg(path),
    );
    let info = common::run_ok(common::nix_cmd("nix").args(["path-info", "--json", "--store"]).arg(&store).arg(path));
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    let sigs: Vec<String> = common::path_info_entry(&info, path)["signatures"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_owned())
        .collect();
    let fingerprint = common::vectors()["paths"][0]["fingerprint"].as_str().unwrap().to_owned();
    assert!(sigs.iter().any(|s| pk.verify(&fingerprint, s)), "no signature by our key in {sigs:?}");
}

#[test]
fn a_world_readable_nkey_seed_is_warned_about() {
    let dir = tempfile::tempdir().unwrap();
    let seed = dir.path().join("builder.nkey");
    std::fs::write(&seed, nkeys::KeyPair::new_user().seed().unwrap()).unwrap();
    common::set_mode(&seed, 0o644);
    let (code, err) = check(&format!(
        "[builder]\nnats_url = \"nats://127.0.0.1:4222\"\nnkey_seed_file = \"{}\"\n[[builder.repos]]\nname = \"r\"\nurl = \"git+file:///r\"\n",
        seed.display()
    ));
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("NKey seed file is readable by other users"), "{err}");
    assert!(!err.contains("SU"), "the seed itself was logged: {err}");
}
