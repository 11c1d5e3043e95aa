//! `hearth flake-update` end to end: a bare git repo as the remote, a flake whose input is another
//! local git repo (so `nix flake update` changes the lock without network), a real nats-server and
//! hearth's builder building every host from the update branch.

#![allow(clippy::unwrap_used)] // Test code: a panic is a failed test.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::builder::BuilderToml;
use common::nats::Nats;
use common::{Hearth, run_ok, set_mode};
use serde_json::Value;

const FLAKE: &str = r#"{
  inputs.dep.url = "git+file://DEP";
  outputs = { self, dep }:
    let
      mk = name: script: {
        config.system.build.toplevel = derivation {
          inherit name;
          system = "SYSTEM";
          builder = "/bin/sh";
          args = [ "-c" script ];
        };
      };
    in {
      nixosConfigurations = {
        h1 = mk "h1" "echo h1 ${dep.value} SALT > $out";
        h2 = mk "h2" (
          if dep.value == "broken" then "echo h2 is broken on purpose >&2; exit 1"
          else if dep.value == "slow" then "while [ ! -e GATE/release ]; do /bin/sleep 0.05; done; echo h2 ${dep.value} SALT > $out"
          else "echo h2 ${dep.value} SALT > $out");
      };
    };
}
"#;

fn git(dir: &Path, args: &[&str]) -> String {
    run_ok(
        Command::new("git")
            .arg("-C")
            .arg(dir)
            .args(args)
            .env("GIT_AUTHOR_NAME", "t")
            .env("GIT_AUTHOR_EMAIL", "t@t")
            .env("GIT_COMMITTER_NAME", "t")
            .env("GIT_COMMITTER_EMAIL", "t@t"),
    )
    .trim()
    .to_owned()
}

fn set_dep(dep: &Path, value: &str) {
    std::fs::write(dep.join("flake.nix"), format!("{{ outputs = {{ self }}: {{ value = \"{value}\"; }}; }}\n"))
        .unwrap();
    git(dep, &["add", "flake.nix"]);
    git(dep, &["commit", "-q", "-m", value]);
}

struct Setup {
    hearth: Hearth,
    nats: Nats,
    dir: tempfile::TempDir,
}

impl Setup {
    fn new() -> Self {
        let nats = Nats::start();
        let dir = tempfile::tempdir().unwrap();
        set_mode(dir.path(), 0o755);
        let p = dir.path();
        let gate = p.join("gate");
        std::fs::create_dir(&gate).unwrap();
        set_mode(&gate, 0o777);
        let mut salt = [0u8; 8];
        getrandom::fill(&mut salt).unwrap();
        let arch = run_ok(Command::new("uname").arg("-m")).trim().to_owned();

        let dep = p.join("dep");
        std::fs::create_dir(&dep).unwrap();
        git(&dep, &["init", "-q", "-b", "master"]);
        set_dep(&dep, "v1");

        let main = p.join("main");
        std::fs::create_dir(&main).unwrap();
        git(&main, &["init", "-q", "-b", "master"]);
        let flake = FLAKE
            .replace("DEP", &dep.display().to_string())
            .replace("SYSTEM", &format!("{arch}-linux"))
            .replace("SALT", &hex::encode(salt))
            .replace("GATE", &gate.display().to_string());
        std::fs::write(main.join("flake.nix"), flake).unwrap();
        git(&main, &["add", "flake.nix"]);
        run_ok(common::nix_cmd("nix").args(["flake", "lock"]).current_dir(&main));
        git(&main, &["add", "flake.lock"]);
        git(&main, &["commit", "-q", "-m", "init"]);
        run_ok(Command::new("git").args(["clone", "-q", "--bare"]).arg(&main).arg(p.join("remote.git")));
        run_ok(Command::new("git").args(["clone", "-q"]).arg(p.join("remote.git")).arg(p.join("work")));

        let hearth = BuilderToml::new(&nats, &p.join("gcroots"))
            .repo("fleet", &format!("git+file://{}", p.join("remote.git").display()))
            .start();
        Setup { hearth, nats, dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn remote_branch(&self, branch: &str) -> Option<String> {
        let out = Command::new("git")
            .arg("-C")
            .arg(self.path("remote.git"))
            .args(["rev-parse", "--verify", "--quiet", branch])
            .output()
            .unwrap();
        out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    fn command(&self) -> Command {
        self.command_on("flake-update/test")
    }

    fn command_on(&self, update_branch: &str) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_hearth"));
        c.args(["flake-update", "--repo", "fleet", "--path"])
            .arg(self.path("work"))
            .args([
                "--update-branch",
                update_branch,
                "--push",
                "--json",
                "--nats-url",
                &self.nats.url(),
                "--nkey-seed-file",
            ])
            .arg(self.nats.seed_path())
            .env("NIX_CONFIG", "experimental-features = nix-command flakes\nsubstituters =\n")
            .env("GIT_AUTHOR_NAME", "hearth")
            .env("GIT_AUTHOR_EMAIL", "hearth@localhost")
            .env("GIT_COMMITTER_NAME", "hearth")
            .env("GIT_COMMITTER_EMAIL", "hearth@localhost");
        c
    }

    fn run(&self) -> (i32, Value) {
        summary(self.command().output().unwrap())
    }
}

fn summary(out: Output) -> (i32, Value) {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last =
        stdout.lines().last().unwrap_or_else(|| panic!("no summary; stderr: {}", String::from_utf8_lossy(&out.stderr)));
    (out.status.code().unwrap_or(-1), serde_json::from_str(last).unwrap_or_else(|e| panic!("{last}: {e}")))
}

#[test]
fn a_good_update_is_promoted_to_master() {
    let s = Setup::new();
    let before = s.remote_branch("master").unwrap();
    set_dep(&s.path("dep"), "v2");
    let dep_rev = git(&s.path("dep"), &["rev-parse", "HEAD"]);
    let (code, sum) = s.run();
    assert_eq!(code, 0, "{sum}");
    assert_eq!(sum["status"], "promoted", "{sum}");
    let commit = sum["commit"].as_str().unwrap();
    assert_eq!(s.remote_branch("master").as_deref(), Some(commit));
    assert_eq!(s.remote_branch("flake-update/test"), None, "the promoted update branch was left behind");
    // A fast-forward: the old master is the new commit's parent.
    assert_eq!(git(&s.path("remote.git"), &["rev-parse", &format!("{commit}^")]), before);
    let lock = git(&s.path("remote.git"), &["show", &format!("{commit}:flake.lock")]);
    assert!(lock.contains(&dep_rev), "the promoted lock does not pin the new dep");
    let message = git(&s.path("remote.git"), &["log", "-1", "--format=%B", commit]);
    assert!(
        message.contains(&format!("- dep: {} -> {}", &sum["inputs"][0]["old"].as_str().unwrap(), &dep_rev[..12])),
        "{message}"
    );
    assert_eq!(sum["hosts"].as_array().unwrap().len(), 2);
    // What each host's system changed is in master's history.
    assert!(message.contains("What changed on each host:") && message.contains("\nh1: "), "{message}");
    assert!(sum["hosts"][0]["changes"].is_object(), "{sum}");
}

#[test]
fn an_update_that_breaks_a_host_leaves_master_alone() {
    let s = Setup::new();
    let before = s.remote_branch("master").unwrap();
    set_dep(&s.path("dep"), "broken");
    let (code, sum) = s.run();
    assert_eq!(code, 1, "{sum}");
    assert_eq!(sum["status"], "build_failed");
    assert_eq!(s.remote_branch("master").as_deref(), Some(before.as_str()), "master moved");
    assert_eq!(
        s.remote_branch("flake-update/test").as_deref(),
        sum["commit"].as_str(),
        "the update branch was not kept"
    );
    let h2 = sum["hosts"].as_array().unwrap().iter().find(|h| h["host"] == "h2").unwrap().clone();
    assert_eq!(h2["status"], "failure");
    assert!(h2["error"].as_str().unwrap().contains("broken on purpose"), "{h2}");
}

#[test]
fn no_change_exits_0_without_a_commit() {
    let s = Setup::new();
    let before = s.remote_branch("master").unwrap();
    let (code, sum) = s.run();
    assert_eq!(code, 0, "{sum}");
    assert_eq!(sum["status"], "unchanged");
    assert!(sum["commit"].is_null());
    assert_eq!(s.remote_branch("master").as_deref(), Some(before.as_str()));
    assert_eq!(s.remote_branch("flake-update/test"), None);
}

#[test]
fn a_master_that_moved_during_the_build_is_not_overwritten() {
    let s = Setup::new();
    set_dep(&s.path("dep"), "slow");
    let child = s.command().stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().unwrap();
    // While h2 waits at the gate, someone pushes to master.
    s.hearth.wait_for_log("build started", 1);
    let other = s.path("other");
    run_ok(Command::new("git").args(["clone", "-q"]).arg(s.path("remote.git")).arg(&other));
    std::fs::write(other.join("README"), "moved\n").unwrap();
    git(&other, &["add", "README"]);
    git(&other, &["commit", "-q", "-m", "someone else"]);
    git(&other, &["push", "-q", "origin", "master"]);
    let moved = s.remote_branch("master").unwrap();
    std::fs::write(s.path("gate").join("release"), "").unwrap();
    let (code, sum) = summary(child.wait_with_output().unwrap());
    assert_eq!(code, 4, "{sum}");
    assert_eq!(sum["status"], "target_moved");
    assert_eq!(s.remote_branch("master").as_deref(), Some(moved.as_str()), "master was overwritten");
    assert!(s.remote_branch("flake-update/test").is_some());
}

#[test]
fn an_update_left_building_by_a_timed_out_run_is_never_promoted_for_a_later_one() {
    let s = Setup::new();
    let before = s.remote_branch("master").unwrap();
    // The first run gives up waiting while h2 is held at the gate; its build goes on.
    set_dep(&s.path("dep"), "slow");
    let (code, first) = summary(s.command().args(["--timeout", "2s"]).output().unwrap());
    assert_eq!(code, 3, "{first}");
    // The input breaks; the second run's request must not join the first run's build.
    set_dep(&s.path("dep"), "broken");
    let child = s.command().stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().unwrap();
    s.hearth.wait_for_log("build request accepted", 2);
    std::fs::write(s.path("gate").join("release"), "").unwrap();
    let (code, sum) = summary(child.wait_with_output().unwrap());
    assert_eq!(code, 1, "{sum}");
    assert_eq!(sum["status"], "build_failed", "{sum}");
    assert_eq!(s.remote_branch("master").as_deref(), Some(before.as_str()), "master moved to an unbuilt lock");
    assert!(s.hearth.log().contains("outcome=queued"), "the second request joined:\n{}", s.hearth.log());
}

#[test]
fn a_branch_hearth_did_not_create_is_never_overwritten() {
    let s = Setup::new();
    let other = s.path("other");
    run_ok(Command::new("git").args(["clone", "-q"]).arg(s.path("remote.git")).arg(&other));
    std::fs::write(other.join("WORK"), "someone's work\n").unwrap();
    git(&other, &["add", "WORK"]);
    git(&other, &["commit", "-q", "-m", "work in progress"]);
    git(&other, &["push", "-q", "origin", "HEAD:refs/heads/develop"]);
    let develop = s.remote_branch("develop").unwrap();
    set_dep(&s.path("dep"), "v3");
    for branch in ["develop", "flake-update/not-ours"] {
        if branch != "develop" {
            git(&other, &["push", "-q", "origin", &format!("HEAD:refs/heads/{branch}")]);
        }
        let (code, sum) = summary(s.command_on(branch).output().unwrap());
        assert_eq!(code, 2, "{sum}");
        assert!(sum["message"].as_str().unwrap().contains("did not create"), "{sum}");
    }
    assert_eq!(s.remote_branch("develop").as_deref(), Some(develop.as_str()), "develop was overwritten");
    assert_eq!(s.remote_branch("flake-update/not-ours").as_deref(), Some(develop.as_str()));
}

/// `command` without the flag `flag`, same environment.
/// `command` with its arguments edited (`None` drops one), same environment.
fn edited(command: &Command, edit: impl Fn(&std::ffi::OsStr) -> Option<&std::ffi::OsStr>) -> Command {
    let mut c = Command::new(command.get_program());
    c.args(command.get_args().filter_map(edit));
    c.envs(command.get_envs().filter_map(|(k, v)| Some((k, v?))));
    c
}

/// `command` without the flag `flag`.
fn without(command: &Command, flag: &str) -> Command {
    edited(command, |a| (a != flag).then_some(a))
}

#[test]
fn an_unknown_input_is_an_error_and_text_output_reads_once() {
    let s = Setup::new();
    let (code, sum) = summary(s.command().args(["--input", "nosuch"]).output().unwrap());
    assert_eq!(code, 2, "{sum}");
    assert!(sum["message"].as_str().unwrap().contains("no input `nosuch`; its inputs: dep"), "{sum}");
    assert_eq!(s.remote_branch("flake-update/test"), None, "pushed before refusing");

    // Text mode: the moved inputs are listed, a failed host's log tail appears once.
    set_dep(&s.path("dep"), "broken");
    let out = without(&s.command(), "--json").output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let all = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(all.contains("input dep: "), "{all}");
    // The failed derivation's own log (`nix log`), indented under the failed host, is printed
    // once, not again by the summary; the live progress showed it as `h2> …`.
    assert_eq!(all.matches("       h2 is broken on purpose").count(), 1, "{all}");
    assert!(all.contains("h2> h2 is broken on purpose"), "{all}");
}

#[test]
fn a_dry_run_says_what_it_committed_once() {
    let s = Setup::new();
    set_dep(&s.path("dep"), "v4");
    // One named input: `nix flake update dep` on Nix 2.19+, `nix flake lock --update-input dep`
    // before (the old form warns that it is deprecated on today's Nix).
    let out = without(&s.command(), "--push").args(["--input", "dep"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let (code, sum) = summary(out);
    assert_eq!(code, 0, "{sum} {stderr}");
    assert_eq!(sum["status"], "committed");
    assert_eq!(sum["inputs"][0]["name"], "dep", "{sum}");
    assert!(!stderr.contains("deprecated"), "{stderr}");
    assert!(!sum["message"].as_str().unwrap().contains("committed"), "{sum}");
}

#[test]
fn nothing_is_pushed_for_a_repo_no_builder_serves_or_another_remote() {
    let s = Setup::new();
    set_dep(&s.path("dep"), "v5");
    let mut c = edited(&s.command(), |a| Some(if a == "fleet" { "nosuch".as_ref() } else { a }));
    let (code, sum) = summary(c.output().unwrap());
    assert_eq!(code, 2, "{sum}");
    assert!(sum["message"].as_str().unwrap().contains("no builder serves repo `nosuch`"), "{sum}");
    assert_eq!(s.remote_branch("flake-update/test"), None, "a branch was pushed first");

    // A clone whose origin is another repository than the one the builder builds.
    let other = s.path("other.git");
    run_ok(Command::new("git").args(["clone", "-q", "--bare"]).arg(s.path("remote.git")).arg(&other));
    git(&s.path("work"), &["remote", "set-url", "origin", &other.display().to_string()]);
    let (code, sum) = s.run();
    assert_eq!(code, 2, "{sum}");
    assert!(sum["message"].as_str().unwrap().contains("nothing was pushed"), "{sum}");
    let pushed = Command::new("git")
        .arg("-C")
        .arg(&other)
        .args(["rev-parse", "--verify", "--quiet", "flake-update/test"])
        .output()
        .unwrap();
    assert!(!pushed.status.success(), "pushed to the other remote");
}
