//! What an operator sees: logs as journald keeps them, the public key lines printed by `keygen`
//! and `serve`, a warning for an unsigned cache, and quiet client commands.

#![allow(clippy::unwrap_used)] // Test code: a panic is a failed test.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

/// Starts `hearth serve` with stderr on a pipe (as under systemd) and `env`; returns the lines up
/// to and including the "hearth serving" line and the lines right after it, then stops it.
fn startup_log(config: &str, env: &[(&str, &str)]) -> String {
    common::ensure_store();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("h.toml");
    std::fs::write(&path, format!("bind = \"127.0.0.1:0\"\n{config}")).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_hearth"))
        .args(["serve", "--config"])
        .arg(&path)
        .env_remove("NO_COLOR")
        .env_remove("HEARTH_LOG")
        .env_remove("JOURNAL_STREAM")
        .envs(env.iter().copied())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut seen = String::new();
    // Startup logs the serving line, then one line per key or the no-key warning.
    for line in lines.by_ref() {
        let line = line.unwrap();
        seen.push_str(&line);
        seen.push('\n');
        if line.contains("trusted-public-keys") || line.contains("no signing key") {
            break;
        }
    }
    let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    let _ = child.wait();
    seen
}

#[test]
fn logs_under_systemd_have_no_colour_and_no_timestamps_and_name_the_keys() {
    let key = common::nix_wire().join("keys/test.sec");
    let config = format!("sign_key_paths = [\"{}\"]\n", key.display());
    // stderr is a pipe: no escape codes, even without NO_COLOR.
    let plain = startup_log(&config, &[]);
    assert!(!plain.contains('\x1b'), "ANSI escapes on a pipe:\n{plain}");
    assert!(plain.lines().next().unwrap().starts_with("20"), "no timestamp outside systemd:\n{plain}");
    let public = std::fs::read_to_string(common::nix_wire().join("keys/test.pub")).unwrap();
    assert!(plain.contains(&format!("trusted-public-keys = {}", public.trim())), "{plain}");
    assert!(plain.contains("compression=none"), "{plain}");
    assert!(!plain.contains("None") && !plain.contains("Some("), "Debug values in the log:\n{plain}");

    // Under systemd, journald stamps lines itself, and reads each line's priority from its
    // `<N>` prefix (so that `journalctl -p warning` finds the warnings).
    let journal = startup_log(&config, &[("JOURNAL_STREAM", "8:12345")]);
    // No timestamp: the priority is followed by the level at once.
    assert!(
        journal.lines().all(|l| [("<6>", "INFO"), ("<4>", "WARN")]
            .iter()
            .any(|(prio, level)| l.strip_prefix(prio).is_some_and(|rest| rest.trim_start().starts_with(level)))),
        "{journal}"
    );
    let unsigned = startup_log("", &[("JOURNAL_STREAM", "8:12345")]);
    assert!(unsigned.lines().any(|l| l.starts_with("<4>") && l.contains("no signing key")), "{unsigned}");
}

#[test]
fn an_unsigned_cache_is_warned_about() {
    let log = startup_log("", &[]);
    assert!(log.contains("WARN") && log.contains("no signing key"), "{log}");
}

#[test]
fn keygen_prints_the_line_clients_need() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_hearth"))
        .args(["keygen", "cache.example.org-1", "--secret-key-file"])
        .arg(dir.path().join("k.sec"))
        .arg("--public-key-file")
        .arg(dir.path().join("k.pub"))
        .output()
        .unwrap();
    assert!(out.status.success());
    let public = std::fs::read_to_string(dir.path().join("k.pub")).unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), format!("trusted-public-keys = {}", public.trim()));
}

#[test]
fn client_commands_print_no_info_lines() {
    let nats = common::nats::Nats::start();
    let out = Command::new(env!("CARGO_BIN_EXE_hearth"))
        .args(["build", "nosuchrepo", "all", "--timeout", "20s", "--nats-url", &nats.url(), "--nkey-seed-file"])
        .arg(nats.seed_path())
        .env_remove("HEARTH_LOG")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("INFO"), "info lines from a client command:\n{err}");
    assert!(err.contains("no builder serves repo `nosuchrepo`"), "{err}");
}

#[test]
fn nkey_makes_a_private_user_seed_and_prints_its_public_key() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let seed_file = dir.path().join("keys/deployer.nkey");
    let run = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_hearth"))
            .args(["nkey", "--seed-file"])
            .arg(&seed_file)
            .output()
            .unwrap()
    };
    let out = run();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let public = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert!(public.starts_with('U') && public.len() == 56, "{public}");
    let seed = std::fs::read_to_string(&seed_file).unwrap();
    assert_eq!(std::fs::metadata(&seed_file).unwrap().permissions().mode() & 0o777, 0o600);
    // The seed is a user's, and it is the printed key's.
    let pair = nkeys::KeyPair::from_seed(seed.trim()).unwrap();
    assert_eq!(pair.public_key(), public);
    // Never over an existing seed.
    let again = run();
    assert!(!again.status.success());
    assert_eq!(std::fs::read_to_string(&seed_file).unwrap(), seed);
}

#[test]
fn a_read_through_cache_without_a_key_says_to_trust_the_builders_keys() {
    let dir = tempfile::tempdir().unwrap();
    for f in ["id", "secret"] {
        std::fs::write(dir.path().join(f), "x").unwrap();
    }
    let config = format!(
        "state_dir = \"{d}/state\"\n[bucket]\nurl = \"s3://hearth?endpoint=http://127.0.0.1:9&region=garage\"\naccess_key_id_file = \"{d}/id\"\nsecret_access_key_file = \"{d}/secret\"\nread_through = true\n",
        d = dir.path().display()
    );
    let log = startup_log(&config, &[]);
    let line = log.lines().find(|l| l.contains("no signing key")).unwrap_or_else(|| panic!("{log}"));
    assert!(line.contains("INFO") && line.contains("trust the builders' keys"), "{line}");
}
