//! What changed on each host: a host built again with a package upgraded, one added and one
//! removed. The final reply, `hearth build`'s text, the metrics, the fleet page and `fleet.json`
//! show the same changes, and they match `nix store diff-closures` of the real Nix on the same two
//! systems. Older generations stay rooted and served for rollback, as many as configured.

#![allow(clippy::unwrap_used)] // Test code: a panic is a failed test.

mod common;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;

use common::builder::BuilderToml;
use common::nats::Nats;
use common::{Hearth, hash_part, nix_cmd, run_ok, set_mode};
use serde_json::Value;

/// A host `web1` whose system references the given packages (`name-version` each).
fn flake(salt: &str, packages: &[&str], rebuild: &str) -> String {
    let system = common::flake::system();
    let pkgs: String = packages.iter().map(|p| format!("(mk \"{p}\") ")).collect();
    format!(
        r#"{{
  outputs = {{ self }}:
    let
      mk = name: derivation {{
        inherit name;
        system = "{system}";
        builder = "/bin/sh";
        args = [ "-c" "echo ${{name}} {salt} > $out" ];
      }};
      # Same name and version, another build: a rebuild.
      bash = derivation {{
        name = "bash-5.2";
        system = "{system}";
        builder = "/bin/sh";
        args = [ "-c" "echo bash {salt} {rebuild} > $out" ];
      }};
      pkgs = [ bash {pkgs}];
    in {{
      nixosConfigurations."web1".config.system.build.toplevel = derivation {{
        name = "nixos-system-web1-26.05";
        system = "{system}";
        builder = "/bin/sh";
        args = [ "-c" "echo ${{toString pkgs}} > $out" ];
      }};
    }};
}}
"#
    )
}

struct Setup {
    hearth: Hearth,
    config: String,
    nats: Nats,
    repo: PathBuf,
    roots: PathBuf,
    salt: String,
    _dir: tempfile::TempDir,
}

fn setup(keep: usize) -> Setup {
    let nats = Nats::start();
    let dir = tempfile::tempdir().unwrap();
    set_mode(dir.path(), 0o755);
    let salt = common::flake::salt();
    let repo = dir.path().join("fleet");
    common::flake::make_repo(&repo, &flake(&salt, &["openssl-3.0.13", "linux-6.6.1", "oldtool-1.0"], "a"));
    let roots = dir.path().join("gcroots");
    let state = dir.path().join("state");
    let config = BuilderToml::new(&nats, &roots)
        .top(&format!("state_dir = \"{}\"", state.display()))
        .with(&format!("keep_generations = {keep}"))
        .repo("fleet", &format!("git+file://{}", repo.display()))
        .render();
    let hearth = common::builder::start(&config);
    Setup { hearth, config, nats, repo, roots, salt, _dir: dir }
}

impl Setup {
    fn commit(&self, packages: &[&str], rebuild: &str) {
        std::fs::write(self.repo.join("flake.nix"), flake(&self.salt, packages, rebuild)).unwrap();
        common::flake::git(&self.repo, &["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "bump"]);
    }

    /// `hearth build fleet web1`, as JSON replies or as text.
    fn build(&self, json: bool) -> (i32, String) {
        let mut c = Command::new(env!("CARGO_BIN_EXE_hearth"));
        c.args(["build", "fleet", "web1", "--nats-url", &self.nats.url(), "--nkey-seed-file"]);
        c.arg(self.nats.seed_path()).env("NO_COLOR", "1");
        if json {
            c.arg("--json");
        }
        let out = c.output().unwrap();
        (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn final_reply(&self) -> Value {
        let (code, out) = self.build(true);
        assert_eq!(code, 0, "{out}");
        serde_json::from_str(out.lines().last().unwrap()).unwrap()
    }
}

/// `nix store diff-closures` as (name, old versions, new versions) for lines with versions.
fn nix_diff(before: &str, after: &str) -> BTreeSet<(String, String, String)> {
    let out = run_ok(nix_cmd("nix").args(["store", "diff-closures", before, after]));
    out.lines()
        .filter_map(|line| {
            // Colour codes may surround the size.
            let line: String = line
                .split('\x1b')
                .enumerate()
                .map(|(i, p)| if i == 0 { p } else { p.split_once('m').map_or("", |x| x.1) })
                .collect();
            let (name, rest) = line.split_once(": ")?;
            let (old, new) = rest.split(", ").next()?.split_once(" → ")?;
            let norm = |s: &str| if s == "∅" { String::new() } else { s.to_owned() };
            Some((name.to_owned(), norm(old), norm(new)))
        })
        .collect()
}

fn ours(changes: &Value) -> BTreeSet<(String, String, String)> {
    let join =
        |v: &Value| v.as_array().unwrap().iter().map(|x| x.as_str().unwrap().to_owned()).collect::<Vec<_>>().join(", ");
    let mut out = BTreeSet::new();
    for c in changes["changed"].as_array().unwrap() {
        out.insert((c["name"].as_str().unwrap().to_owned(), join(&c["old"]), join(&c["new"])));
    }
    for a in changes["added"].as_array().unwrap() {
        out.insert((a["name"].as_str().unwrap().to_owned(), String::new(), join(&a["versions"])));
    }
    for r in changes["removed"].as_array().unwrap() {
        out.insert((r["name"].as_str().unwrap().to_owned(), join(&r["versions"]), String::new()));
    }
    out
}

fn metric(text: &str, series: &str) -> f64 {
    text.lines().find_map(|l| l.strip_prefix(series)?.trim().parse().ok()).unwrap_or_else(|| panic!("no {series}"))
}

fn deletable(path: &str) -> bool {
    nix_cmd("nix-store").args(["--delete", path]).output().unwrap().status.success()
}

#[test]
fn a_second_build_reports_what_changed_everywhere_and_matches_diff_closures() {
    let s = setup(3);
    let first = s.final_reply();
    let old = first["out_path"].as_str().unwrap().to_owned();
    assert_eq!(first["hosts"][0]["changes"]["first_build"], true, "{first}");
    // The page (rendered once per change of the record) says generation 1 now...
    assert!(s.hearth.get("/").text().contains("generation 1"));

    // openssl upgraded, newtool added, oldtool removed, bash rebuilt.
    s.commit(&["openssl-3.0.14", "linux-6.6.1", "newtool-2.1"], "b");
    let second = s.final_reply();
    let new = second["out_path"].as_str().unwrap().to_owned();
    let changes = &second["hosts"][0]["changes"];
    let expected: BTreeSet<(String, String, String)> =
        [("newtool", "", "2.1"), ("oldtool", "1.0", ""), ("openssl", "3.0.13", "3.0.14")]
            .iter()
            .map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string()))
            .collect();
    assert_eq!(ours(changes), expected, "{changes}");
    assert_eq!(ours(changes), nix_diff(&old, &new), "hearth and nix store diff-closures disagree");
    // bash (same version, new hash) and the system itself are rebuilds.
    assert_eq!(changes["rebuilt"], 2, "{changes}");
    assert_eq!(changes["paths_before"], changes["paths_after"]);

    // ...and the same on the fleet page (rendered anew), fleet.json and in the metrics.
    let page = s.hearth.get("/").text();
    assert!(
        page.contains("<b>openssl</b> 3.0.13 → 3.0.14") && page.contains("newtool") && page.contains("oldtool"),
        "{page}"
    );
    assert!(page.contains("generation 2"), "{page}");
    let fleet: Value = serde_json::from_slice(&s.hearth.get("/fleet.json").body).unwrap();
    let host = &fleet["hosts"][0];
    assert_eq!((host["repo"].as_str(), host["host"].as_str()), (Some("fleet"), Some("web1")));
    assert_eq!(&host["changes"], changes);
    let m = s.hearth.get("/metrics").text();
    let label = "{repo=\"fleet\",host=\"web1\"}";
    assert_eq!(metric(&m, &format!("hearth_host_closure_bytes{label}")), changes["bytes_after"].as_f64().unwrap());
    assert_eq!(metric(&m, &format!("hearth_host_closure_paths{label}")), changes["paths_after"].as_f64().unwrap());
    for secret in ["SU", "nkey", "BEGIN"] {
        assert!(!page.contains(secret), "the page shows `{secret}`");
    }

    // hearth build's own text: a summary line per host and the version lines.
    s.commit(&["openssl-3.0.15", "linux-6.6.1", "newtool-2.1"], "b");
    let (code, text) = s.build(false);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("web1: 1 changed, 0 added, 0 removed"), "{text}");
    assert!(text.contains("openssl: 3.0.14 → 3.0.15"), "{text}");

    // Three generations: the two older systems are still roots and still served.
    let gens = std::fs::read_dir(s.roots.join("fleet/.generations/web1")).unwrap().count();
    assert_eq!(gens, 3);
    for p in [&old, &new] {
        assert_eq!(s.hearth.get(&format!("/{}.narinfo", hash_part(p))).status, 200);
        assert!(!deletable(p), "{p} could be garbage-collected");
    }
    let dest = tempfile::tempdir().unwrap();
    let key = std::fs::read_to_string(common::nix_wire().join("keys/test.pub")).unwrap();
    let copy = nix_cmd("nix")
        .args(["copy", "--from", &s.hearth.url(), "--to"])
        .arg(dest.path())
        .args(["--option", "trusted-public-keys", key.trim(), &old])
        .output()
        .unwrap();
    assert!(copy.status.success(), "rollback copy: {}", String::from_utf8_lossy(&copy.stderr));

    // A restart keeps the record: generations from the roots, the last build from the state
    // file, the changes worked out again from the store.
    let before: Value = serde_json::from_slice(&s.hearth.get("/fleet.json").body).unwrap();
    let mut s = s;
    s.hearth = common::builder::start(&s.config);
    // Read back before the builder takes a request: a build can never race the recovery.
    let after: Value = serde_json::from_slice(&s.hearth.get("/fleet.json").body).unwrap();
    assert_eq!(after["hosts"], before["hosts"], "the record when the builder took requests again");
}

#[test]
fn with_keep_generations_1_only_the_newest_is_rooted() {
    let s = setup(1);
    let old = s.final_reply()["out_path"].as_str().unwrap().to_owned();
    s.commit(&["openssl-3.0.14", "linux-6.6.1"], "a");
    let new = s.final_reply()["out_path"].as_str().unwrap().to_owned();
    assert_ne!(old, new);
    assert!(!deletable(&new), "the newest system is not rooted");
    let roots = run_ok(nix_cmd("nix-store").args(["--query", "--roots", &old]));
    let roots_dir = s.roots.to_string_lossy().into_owned();
    assert!(!roots.contains(&roots_dir), "an old generation beyond keep_generations is still rooted:\n{roots}");
    // A path hearth served may stay pinned by a temp root (a minute at most) while hearth
    // runs; once it stops, nothing holds the old generation any more.
    drop(s.hearth);
    common::wait_until("the old generation to be deletable", std::time::Duration::from_secs(20), || deletable(&old));
}

impl Setup {
    /// The final reply of `hearth build fleet web1` with more arguments.
    fn final_reply_with(&self, extra: &[&str]) -> Value {
        let out = Command::new(env!("CARGO_BIN_EXE_hearth"))
            .args(["build", "fleet", "web1", "--json", "--nats-url", &self.nats.url(), "--nkey-seed-file"])
            .arg(self.nats.seed_path())
            .args(extra)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        serde_json::from_str(stdout.lines().last().unwrap()).unwrap()
    }

    fn host(&self) -> Value {
        let fleet: Value = serde_json::from_slice(&self.hearth.get("/fleet.json").body).unwrap();
        fleet["hosts"][0].clone()
    }
}

#[test]
fn only_the_deploy_branch_makes_generations_and_rebuilds_keep_the_real_changes() {
    let s = setup(3);
    let git = |args: &[&str]| common::flake::git(&s.repo, args);
    let gen1 = s.final_reply()["out_path"].as_str().unwrap().to_owned();
    s.commit(&["openssl-3.0.14", "linux-6.6.1", "oldtool-1.0"], "a");
    let gen2 = s.final_reply()["out_path"].as_str().unwrap().to_owned();
    let changed = s.host()["changes"].clone();
    assert!(changed.to_string().contains("3.0.14"), "{changed}");

    // An experiment on another branch: recorded under its branch, never as web1's state.
    git(&["checkout", "-q", "-b", "exp"]);
    s.commit(&["openssl-3.1.0", "linux-6.6.1", "oldtool-1.0"], "a");
    git(&["checkout", "-q", "master"]);
    let exp = s.final_reply_with(&["--branch", "exp"]);
    assert_eq!(exp["status"], "completed", "{exp}");
    let host = s.host();
    let paths: Vec<&str> =
        host["generations"].as_array().unwrap().iter().map(|g| g["path"].as_str().unwrap()).collect();
    assert_eq!(paths, [gen1.as_str(), gen2.as_str()], "a branch build became a generation");
    assert_eq!(host["changes"], changed, "a branch build changed the host's changes");
    assert_eq!(host["branches"]["exp"]["status"], "success", "{host}");
    assert_eq!(std::fs::read_link(s.roots.join("fleet/web1")).unwrap().to_str(), Some(gen2.as_str()));
    assert!(s.roots.join("fleet/.branches/exp/web1").exists(), "the branch build is not rooted");
    let page = s.hearth.get("/").text();
    assert!(page.contains("branch <code>exp</code>"), "{page}");

    // A failing branch build does not make the host FAILED.
    git(&["checkout", "-q", "exp"]);
    std::fs::write(
        s.repo.join("flake.nix"),
        std::fs::read_to_string(s.repo.join("flake.nix")).unwrap().replace("echo ${toString pkgs}", "exit 1; echo"),
    )
    .unwrap();
    git(&["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "break"]);
    git(&["checkout", "-q", "master"]);
    assert_eq!(s.final_reply_with(&["--branch", "exp"])["status"], "failed");
    let host = s.host();
    assert_eq!(host["last_build"]["status"], "success", "{host}");
    assert_eq!(host["branches"]["exp"]["status"], "failure", "{host}");

    // Rebuilding unchanged master: no new generation, and the real changes stay.
    let again = s.final_reply();
    assert_eq!(again["out_path"].as_str(), Some(gen2.as_str()));
    let host = s.host();
    assert_eq!(host["generations"].as_array().unwrap().len(), 2);
    assert_eq!(host["changes"], changed, "an unchanged rebuild replaced the changes");

    // Going back to generation 1's system: it becomes the newest and holds one slot only.
    s.commit(&["openssl-3.0.13", "linux-6.6.1", "oldtool-1.0"], "a");
    assert_eq!(s.final_reply()["out_path"].as_str(), Some(gen1.as_str()));
    let host = s.host();
    let paths: Vec<&str> =
        host["generations"].as_array().unwrap().iter().map(|g| g["path"].as_str().unwrap()).collect();
    assert_eq!(paths, [gen2.as_str(), gen1.as_str()]);
    assert!(host["changes"].to_string().contains("3.0.13"), "{host}");
}
