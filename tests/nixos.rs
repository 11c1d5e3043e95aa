//! The NixOS module, alert rules and dashboard: every `.nix` file parses, every module option is
//! documented, the rules pass promtool's checks and unit tests, hearth's `/metrics` passes
//! `promtool check metrics`, and the dashboard only queries metrics hearth exports.

#![allow(clippy::unwrap_used)] // Test code: a panic is a failed test.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn files_with_ext(dir: &Path, ext: &str, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy();
        if path.is_dir() && name != "target" && !name.starts_with('.') {
            files_with_ext(&path, ext, out);
        } else if path.extension().is_some_and(|e| e == ext) {
            out.push(path);
        }
    }
}

#[test]
fn every_nix_file_parses() {
    let mut files = Vec::new();
    files_with_ext(&root(), "nix", &mut files);
    assert!(files.len() >= 3, "{files:?}");
    for f in files {
        let out = Command::new("nix-instantiate").arg("--parse").arg(&f).output().expect("nix-instantiate (nix-bin)");
        assert!(out.status.success(), "{}: {}", f.display(), String::from_utf8_lossy(&out.stderr));
    }
}

#[test]
fn every_module_option_is_documented() {
    let module = std::fs::read_to_string(root().join("nixos-module/default.nix")).unwrap();
    let docs = std::fs::read_to_string(root().join("docs/nixos.md")).unwrap();
    let mut count = 0;
    for line in module.lines() {
        let Some((lhs, _)) = line.split_once(" = lib.mkOption").or_else(|| line.split_once(" = lib.mkEnableOption"))
        else {
            continue;
        };
        let leaf = lhs.trim();
        count += 1;
        // Documented as a full option path, or (for typed settings) as `settings.<path>`.
        let suffix = format!(".{leaf}");
        let documented = docs
            .split('`')
            .any(|s| (s.starts_with("services.hearth.") || s.starts_with("settings.")) && s.ends_with(&suffix));
        assert!(documented, "option `{leaf}` is not in docs/nixos.md");
    }
    assert!(count >= 20, "found only {count} options");
}

fn promtool(args: &[&str], dir: &Path) -> String {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("promtool (Debian's prometheus package; scripts/test installs it)");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "promtool {args:?}: {text}");
    text
}

#[test]
fn alert_rules_pass_promtool_checks_and_unit_tests() {
    let dir = root().join("nixos-module/monitoring");
    assert!(promtool(&["check", "rules", "rules.yml"], &dir).contains("5 rules found"));
    assert!(promtool(&["test", "rules", "rules.test.yml"], &dir).contains("SUCCESS"));
}

fn live_metrics() -> String {
    // A builder whose NATS is unreachable: hearth starts anyway (it connects in the background),
    // and the builder's families have their per-repo series.
    let h = common::Hearth::start(
        "[builder]\nnats_url = \"nats://127.0.0.1:1\"\n[[builder.repos]]\nname = \"fleet\"\nurl = \"git+file:///nonexistent\"\n",
    );
    // Some traffic, so that labelled families have series.
    assert_eq!(h.get("/nix-cache-info").status, 200);
    assert_eq!(h.get("/00000000000000000000000000000000.narinfo").status, 404);
    h.get("/metrics").text()
}

#[test]
fn metrics_pass_promtool_check_metrics() {
    let text = live_metrics();
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool");
    use std::io::Write;
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_dashboard_queries_only_exported_metrics() {
    // Families with no series yet (a histogram before its first build) print nothing, so the
    // registered names come from the source and the live output together.
    let text = live_metrics();
    let source = std::fs::read_to_string(root().join("src/metrics.rs")).unwrap();
    let mut exported: Vec<String> =
        text.lines().filter_map(|l| l.strip_prefix("# TYPE ")?.split(' ').next()).map(str::to_owned).collect();
    exported.extend(
        source
            .split("registry.register(")
            .skip(1)
            .filter_map(|s| s.trim_start().strip_prefix('"')?.split('"').next())
            .map(str::to_owned),
    );
    let dash: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root().join("nixos-module/monitoring/dashboard.json")).unwrap())
            .unwrap();
    let mut exprs = Vec::new();
    for panel in dash["panels"].as_array().unwrap() {
        for t in panel["targets"].as_array().into_iter().flatten() {
            exprs.push(t["expr"].as_str().unwrap().to_owned());
        }
    }
    assert!(exprs.len() >= 12);
    for expr in exprs {
        for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
            if word.starts_with("hearth_") || word.starts_with("homelab_deploy_") {
                let base = word
                    .trim_end_matches("_bucket")
                    .trim_end_matches("_count")
                    .trim_end_matches("_sum")
                    .trim_end_matches("_total");
                assert!(
                    exported.iter().any(|e| e == base || e == word),
                    "dashboard uses `{word}`, which hearth does not export"
                );
            }
        }
    }
}
