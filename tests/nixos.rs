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
    assert!(promtool(&["check", "rules", "rules.yml"], &dir).contains("2 rules found"));
    assert!(promtool(&["check", "rules", "builder-rules.yml"], &dir).contains("9 rules found"));
    assert!(promtool(&["test", "rules", "rules.test.yml"], &dir).contains("SUCCESS"));
}

#[test]
fn the_builder_rules_are_installed_only_where_the_builder_runs() {
    let names = |v: &serde_json::Value| -> Vec<String> {
        v["ruleFiles"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f.as_str().unwrap().split_once('-').unwrap().1.to_owned())
            .collect()
    };
    let cache_only =
        eval_module(&format!(r#"{{ services.hearth = {{ enable = true; {PACKAGE} alerts.enable = true; }}; }}"#))
            .unwrap();
    assert_eq!(names(&cache_only), ["hearth-rules.yml"]);
    let build_host = eval_module(&format!(
        r#"{{ services.hearth = {{ enable = true; {PACKAGE} alerts.enable = true; {FULL_BUILDER} }}; }}"#
    ))
    .unwrap();
    assert_eq!(names(&build_host), ["hearth-rules.yml", "hearth-builder-rules.yml"]);
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

/// The module evaluated with nixpkgs' module system (tests/nixos/eval.nix) for `configuration`
/// (a Nix expression): the rendered units, TOML, assertions and warnings; or the evaluation error.
fn eval_module(configuration: &str) -> Result<serde_json::Value, String> {
    let lib = root().join("../shared/nixpkgs-lib/lib");
    assert!(lib.exists(), "{} is missing: it holds nixpkgs' lib for this test", lib.display());
    let expr = format!(
        "import {harness} {{ lib = import {lib}; configuration = {{ lib, ... }}: {configuration}; }}",
        harness = root().join("tests/nixos/eval.nix").display(),
        lib = lib.display(),
    );
    let out = Command::new("nix-instantiate")
        .args(["--eval", "--strict", "--json", "--read-write-mode", "--expr", &expr])
        .output()
        .expect("nix-instantiate (nix-bin)");
    if out.status.success() {
        Ok(serde_json::from_slice(&out.stdout).unwrap())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

const PACKAGE: &str = r#"package = { type = "derivation"; name = "hearth"; outPath = "/nix/store/00000000000000000000000000000000-hearth"; };"#;

/// Runs the rendered TOML through `hearth check-config`, with the credentials systemd would pass
/// replaced by real test files.
fn check_rendered_toml(toml: &str) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(common::nix_wire().join("keys/test.sec"), dir.path().join("sign-key-0")).unwrap();
    for name in ["builder-nkey", "fleet-nkey"] {
        std::fs::write(dir.path().join(name), nkeys::KeyPair::new_user().seed().unwrap()).unwrap();
    }
    for (name, value) in [("s3-access-key-id", "GK0123456789abcdef01234567"), ("s3-secret-access-key", "s3cr3t")] {
        std::fs::write(dir.path().join(name), value).unwrap();
        std::fs::set_permissions(dir.path().join(name), std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    }
    let toml = toml
        .replace("/run/credentials/hearth.service", &dir.path().display().to_string())
        .replace("/run/credentials/hearth-bucket-gc.service", &dir.path().display().to_string());
    let path = dir.path().join("hearth.toml");
    std::fs::write(&path, &toml).unwrap();
    let out =
        Command::new(env!("CARGO_BIN_EXE_hearth")).args(["check-config", "--config"]).arg(&path).output().unwrap();
    assert!(
        out.status.success(),
        "check-config refused the rendered TOML:\n{toml}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn service<'a>(v: &'a serde_json::Value, name: &str) -> &'a str {
    v["services"][name].as_str().unwrap_or_else(|| panic!("no service {name}: {v}"))
}

const FULL_BUILDER: &str = r#"
    builder = {
      enable = true;
      natsUrl = "nats://nats.home.2rjus.net:4222";
      nkeySeedFile = "/run/secrets/hearth-builder.nkey";
      repos = [ { name = "nixos-servers"; url = "git+https://git.t-juice.club/torjus/nixos-servers.git"; } ];
    };
    scheduler = { enable = true; repos = [ "nixos-servers" ]; nkeySeedFile = "/run/secrets/hearth-scheduler.nkey"; };
"#;

#[test]
fn the_module_evaluates_with_defaults_and_renders_a_hardened_unit() {
    let v = eval_module(&format!("{{ services.hearth = {{ enable = true; {PACKAGE} }}; }}")).unwrap();
    let unit = service(&v, "hearth");
    for line in [
        "Type=notify",
        "User=hearth",
        "ProtectSystem=strict",
        "SystemCallFilter=@system-service",
        "NoNewPrivileges=true",
        "OOMPolicy=continue",
    ] {
        assert!(unit.lines().any(|l| l == line), "no `{line}` in\n{unit}");
    }
    assert_eq!(v["wantedBy"]["hearth"], serde_json::json!(["multi-user.target"]));
    assert_eq!(v["failedAssertions"], serde_json::json!([]));
    assert_eq!(v["warnings"], serde_json::json!([]));
    let toml = v["toml"].as_str().unwrap();
    assert!(toml.contains("bind = \"127.0.0.1:5000\""), "{toml}");
    check_rendered_toml(toml);
}

#[test]
fn the_documented_build_host_renders_credentials_gc_roots_and_a_hardened_scheduler() {
    let v = eval_module(&format!(
        r#"{{ services.hearth = {{ enable = true; {PACKAGE}
            signKeyPaths = [ "/run/secrets/nix-cache02.home.2rjus.net-1.sec" ];
            alerts.enable = true; {FULL_BUILDER} }}; }}"#
    ))
    .unwrap();
    let unit = service(&v, "hearth");
    assert!(unit.contains("LoadCredential=sign-key-0:/run/secrets/nix-cache02.home.2rjus.net-1.sec\n"), "{unit}");
    assert!(unit.contains("LoadCredential=builder-nkey:/run/secrets/hearth-builder.nkey\n"), "{unit}");
    // The GC-root directory: optional in the sandbox, created before the start on a first switch.
    assert!(unit.contains("ReadWritePaths=-/nix/var/nix/gcroots/hearth\n"), "{unit}");
    // The running build's shutdown grace (30 s) and its stop fit before systemd kills hearth.
    assert!(unit.contains("TimeoutStopSec=70\n"), "{unit}");
    assert!(unit.contains("ExecStartPre=+/nix/store/00000000000000000000000000000000-coreutils/bin/install -d -m 0755 -o hearth -g hearth /nix/var/nix/gcroots/hearth\n"), "{unit}");
    assert_eq!(v["tmpfiles"], serde_json::json!(["d /nix/var/nix/gcroots/hearth 0755 hearth hearth -"]));
    let scheduler = service(&v, "hearth-scheduled-build");
    for line in [
        "SystemCallFilter=@system-service",
        "RestrictAddressFamilies=AF_INET",
        "PrivateDevices=true",
        "DynamicUser=true",
    ] {
        assert!(scheduler.lines().any(|l| l == line), "scheduler lacks `{line}`:\n{scheduler}");
    }
    let timer = v["timers"]["hearth-scheduled-build"].as_str().unwrap();
    assert!(timer.contains("OnUnitActiveSec=2h") && !timer.contains("Persistent"), "{timer}");
    let toml = v["toml"].as_str().unwrap();
    assert!(
        toml.contains("[[builder.repos]]")
            && toml.contains("nkey_seed_file = \"/run/credentials/hearth.service/builder-nkey\""),
        "{toml}"
    );
    check_rendered_toml(toml);
}

#[test]
fn every_option_set_renders_and_checks() {
    let v = eval_module(&format!(
        r#"{{ services.hearth = {{ enable = true; {PACKAGE}
            listenAddress = "0.0.0.0"; port = 5001; openFirewall = true; metricsPort = 9974;
            addToNixAllowedUsers = true; signKeyPaths = [ "/run/secrets/a.sec" ];
            settings = {{ priority = 40; compression = {{ algorithm = "zstd"; level = 9; }}; max_nar_streams = 64; }};
            alerts = {{ enable = true; narBandwidthBytesPerSecond = 50000000; }};
            builder.timeoutSeconds = 3600; builder.keepGenerations = 5; {FULL_BUILDER} }}; }}"#
    ))
    .unwrap();
    assert_eq!(v["firewall"], serde_json::json!([5001, 9974]));
    assert_eq!(v["allowedUsers"], serde_json::json!(["hearth"]));
    assert_eq!(v["warnings"], serde_json::json!([]));
    let toml = v["toml"].as_str().unwrap();
    for needle in [
        "bind = \"0.0.0.0:5001\"",
        "priority = 40",
        "algorithm = \"zstd\"",
        "max_nar_streams = 64",
        "build_timeout_seconds = 3600",
        "keep_generations = 5",
        "bind = \"0.0.0.0:9974\"",
    ] {
        assert!(toml.contains(needle), "no `{needle}` in\n{toml}");
    }
    check_rendered_toml(toml);
}

#[test]
fn ipv6_listeners_are_bracketed_and_socket_activation_starts_on_demand() {
    let v = eval_module(&format!(
        r#"{{ services.hearth = {{ enable = true; {PACKAGE} listenAddress = "::1"; socketActivation = true; }}; }}"#
    ))
    .unwrap();
    let socket = v["sockets"]["hearth"].as_str().unwrap();
    assert!(socket.contains("ListenStream=[::1]:5000\n"), "{socket}");
    assert_eq!(v["wantedBy"]["hearth.socket"], serde_json::json!(["sockets.target"]));
    assert_eq!(v["wantedBy"]["hearth"], serde_json::json!([]), "started at boot despite socket activation");
    let toml = v["toml"].as_str().unwrap();
    assert!(toml.contains("bind = \"[::1]:5000\"") && toml.contains("bind = \"[::1]:9973\""), "{toml}");
    check_rendered_toml(toml);
}

#[test]
fn a_scheduler_only_host_evaluates_and_says_which_option_it_needs() {
    let base = r#"scheduler = { enable = true; repos = [ "fleet" ]; nkeySeedFile = "/run/secrets/s.nkey"; };"#;
    let v = eval_module(&format!(
        r#"{{ services.hearth = {{ {PACKAGE} {base} scheduler.natsUrl = "nats://nats:4222"; }}; }}"#
    ))
    .unwrap();
    assert!(service(&v, "hearth-scheduled-build").contains("ExecStart="));
    assert!(v["services"]["hearth"].is_null());
    let err = eval_module(&format!("{{ services.hearth = {{ {PACKAGE} {base} }}; }}")).unwrap_err();
    assert!(err.contains("services.hearth.scheduler.natsUrl has no value"), "{err}");
}

const BUCKET: &str = r#"
    bucket = {
      enable = true;
      url = "s3://nix-cache?endpoint=http://garage.home.2rjus.net:3900&region=garage";
      accessKeyIdFile = "/run/secrets/s3-id";
      secretAccessKeyFile = "/run/secrets/s3-secret";
      readThrough = true;
      publicUrl = "http://nix-cache.web.garage.home.2rjus.net:3902";
      gc = { enable = true; schedule = "Sun 04:00"; grace = "2d"; };
    };
"#;

#[test]
fn the_bucket_gets_its_credentials_and_a_gc_timer_with_its_own() {
    let v = eval_module(&format!(
        r#"{{ services.hearth = {{ enable = true; {PACKAGE}
            signKeyPaths = [ "/run/secrets/a.sec" ]; {FULL_BUILDER} {BUCKET} }}; }}"#
    ))
    .unwrap();
    assert_eq!(v["failedAssertions"], serde_json::json!([]));
    let unit = service(&v, "hearth");
    for line in [
        "LoadCredential=s3-access-key-id:/run/secrets/s3-id",
        "LoadCredential=s3-secret-access-key:/run/secrets/s3-secret",
    ] {
        assert!(unit.lines().any(|l| l == line), "no `{line}` in\n{unit}");
    }
    let toml = v["toml"].as_str().unwrap();
    for needle in [
        "[bucket]",
        "secret_access_key_file = \"/run/credentials/hearth.service/s3-secret-access-key\"",
        "read_through = true",
        "public_url = \"http://nix-cache.web.garage.home.2rjus.net:3902\"",
    ] {
        assert!(toml.contains(needle), "no `{needle}` in\n{toml}");
    }
    check_rendered_toml(toml);

    // The collector: hearth's user and state, the same secrets under its own credential directory.
    let gc = service(&v, "hearth-bucket-gc");
    for line in
        ["Type=oneshot", "User=hearth", "ProtectSystem=strict", "LoadCredential=s3-access-key-id:/run/secrets/s3-id"]
    {
        assert!(gc.lines().any(|l| l == line), "no `{line}` in\n{gc}");
    }
    let exec = gc.lines().find_map(|l| l.strip_prefix("ExecStart=")).unwrap();
    let args: Vec<&str> = exec.split(' ').collect();
    assert_eq!(
        (args[1], args[2], args[3], &args[5..]),
        ("bucket", "gc", "--config", &["--grace", "2d", "--once-per", "1d"][..]),
        "{exec}"
    );
    let gc_toml = std::fs::read_to_string(args[4]).unwrap();
    assert!(gc_toml.contains("/run/credentials/hearth-bucket-gc.service/s3-secret-access-key"), "{gc_toml}");
    assert!(!gc_toml.contains("/run/credentials/hearth.service/"), "{gc_toml}");
    check_rendered_toml(&gc_toml);
    let timer = v["timers"]["hearth-bucket-gc"].as_str().unwrap();
    assert!(timer.contains("OnCalendar=Sun 04:00\n") && timer.contains("Persistent=true\n"), "{timer}");
    assert_eq!(v["wantedBy"]["hearth-bucket-gc.timer"], serde_json::json!(["timers.target"]));

    // Without the builder nothing says what to keep: an assertion, not a timer that fails weekly.
    let v = eval_module(&format!("{{ services.hearth = {{ enable = true; {PACKAGE} {BUCKET} }}; }}")).unwrap();
    assert!(v["failedAssertions"][0].as_str().unwrap().contains("fleet record says what the bucket must keep"), "{v}");
}

#[test]
fn mistakes_fail_evaluation_with_a_reason() {
    // A secret as a path literal would be copied into the world-readable store.
    let err = eval_module(&format!(
        r#"{{ services.hearth = {{ enable = true; {PACKAGE} signKeyPaths = [ ./cache.sec ]; }}; }}"#
    ))
    .unwrap_err();
    assert!(err.contains("signKeyPaths") && err.contains("not in the Nix store"), "{err}");
    let err = eval_module(&format!(
        r#"{{ services.hearth = {{ enable = true; {PACKAGE} builder = {{ enable = true; natsUrl = "nats://n:4222"; nkeySeedFile = ./seed; repos = [ {{ name = "r"; url = "git+file:///r"; }} ]; }}; }}; }}"#
    ))
    .unwrap_err();
    assert!(err.contains("nkeySeedFile") && err.contains("not in the Nix store"), "{err}");
    // A builder with nothing to build is an assertion, not a unit that fails at run time.
    let v = eval_module(&format!(
        r#"{{ services.hearth = {{ enable = true; {PACKAGE} builder = {{ enable = true; natsUrl = "nats://n:4222"; nkeySeedFile = "/run/secrets/b"; }}; }}; }}"#
    ))
    .unwrap();
    assert!(v["failedAssertions"][0].as_str().unwrap().contains("builder.repos is empty"), "{v}");
    // The firewall opened for a listener nobody outside can reach.
    let v =
        eval_module(&format!("{{ services.hearth = {{ enable = true; {PACKAGE} openFirewall = true; }}; }}")).unwrap();
    assert!(v["warnings"][0].as_str().unwrap().contains("listens on 127.0.0.1 only"), "{v}");
    // Imported directly, without the flake: the error says what to set.
    let err = eval_module("{ services.hearth.enable = true; }").unwrap_err();
    assert!(err.contains("services.hearth.package has no value") && err.contains("nixosModules.default"), "{err}");
}

/// A GET from a chosen loopback source address (127.0.0.2 stands for a host that is not an
/// operator's); returns the status.
fn get_from(source: [u8; 4], addr: &str, path: &str) -> u16 {
    use std::io::{Read, Write};
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.bind(&std::net::SocketAddr::from((source, 0)).into()).unwrap();
    sock.connect(&addr.parse::<std::net::SocketAddr>().unwrap().into()).unwrap();
    let mut s: std::net::TcpStream = sock.into();
    s.set_read_timeout(Some(std::time::Duration::from_secs(30))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").unwrap();
    let mut head = [0u8; 12];
    s.read_exact(&mut head).unwrap();
    String::from_utf8_lossy(&head[9..12]).parse().unwrap()
}

#[test]
fn the_example_nginx_loads_serves_the_cache_and_keeps_the_operator_pages_to_operators() {
    common::ensure_store();
    let h = common::Hearth::start("");
    let hearth_port: u16 = h.addr.rsplit(':').next().unwrap().parse().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    common::set_mode(dir.path(), 0o755);
    for sub in ["body", "proxy", "cache"] {
        std::fs::create_dir(dir.path().join(sub)).unwrap();
        common::set_mode(&dir.path().join(sub), 0o777);
    }
    let lib = root().join("../shared/nixpkgs-lib/lib");
    let expr = format!(
        "import {harness} {{ lib = import {lib}; hearthPort = {hearth_port}; listen = \"127.0.0.1:{port}\"; prefix = \"{prefix}\"; }}",
        harness = root().join("tests/nixos/nginx.nix").display(),
        lib = lib.display(),
        prefix = dir.path().display(),
    );
    let out = Command::new("nix-instantiate").args(["--eval", "--strict", "--json", "--expr", &expr]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let conf: String = serde_json::from_slice(&out.stdout).unwrap();
    let conf_path = dir.path().join("nginx.conf");
    std::fs::write(&conf_path, &conf).unwrap();
    // nginx itself accepts the configuration as NixOS renders it.
    let test =
        Command::new("nginx").arg("-t").arg("-c").arg(&conf_path).output().expect("nginx (scripts/test installs it)");
    assert!(test.status.success(), "nginx -t:\n{}\n{conf}", String::from_utf8_lossy(&test.stderr));

    struct Running(std::process::Child);
    impl Drop for Running {
        fn drop(&mut self) {
            // SIGTERM: the master stops its workers (SIGKILL would leave them behind).
            let _ = Command::new("kill").args(["-TERM", &self.0.id().to_string()]).status();
            let _ = self.0.wait();
        }
    }
    let _nginx = Running(Command::new("nginx").arg("-c").arg(&conf_path).spawn().unwrap());
    let addr = format!("127.0.0.1:{port}");
    common::wait_until("nginx to listen", std::time::Duration::from_secs(30), || {
        std::net::TcpStream::connect(&addr).is_ok()
    });
    // The cache is public; the operator's pages only for operators (loopback in the example).
    let other = [127, 0, 0, 2];
    assert_eq!(get_from(other, &addr, "/nix-cache-info"), 200);
    assert_eq!(get_from(other, &addr, "/sah6ys5p5a453b5xrprp9mrssbc61147.narinfo"), 200);
    assert_eq!(get_from(other, &addr, "/00000000000000000000000000000000.narinfo"), 404);
    for private in ["/", "/fleet.json", "/metrics", "/log/39bvdmldxycprsns8aq5n5r1lffhp1mx-withrefs.drv"] {
        assert_eq!(get_from(other, &addr, private), 403, "{private} is public");
    }
    assert_eq!(get_from([127, 0, 0, 1], &addr, "/"), 200);
    assert_eq!(get_from([127, 0, 0, 1], &addr, "/metrics"), 200);
}

#[test]
fn metrics_can_listen_apart_and_git_ssh_repos_get_a_deploy_key() {
    let v = eval_module(&format!(
        r#"{{ services.hearth = {{ enable = true; {PACKAGE} metricsListenAddress = "0.0.0.0";
            builder = {{ enable = true; natsUrl = "nats://nats:4222"; nkeySeedFile = "/run/secrets/hearth-builder.nkey";
              sshKeyFile = "/run/secrets/hearth-deploy-key";
              repos = [ {{ name = "fleet"; url = "git+ssh://git@git.example.org/fleet.git"; }} ]; }}; }}; }}"#
    ))
    .unwrap();
    let toml = v["toml"].as_str().unwrap();
    // The cache stays on loopback; Prometheus elsewhere can reach the metrics.
    assert!(toml.contains("bind = \"127.0.0.1:5000\"") && toml.contains("bind = \"0.0.0.0:9973\""), "{toml}");
    let unit = service(&v, "hearth");
    assert!(unit.contains("LoadCredential=builder-ssh-key:/run/secrets/hearth-deploy-key\n"), "{unit}");
    assert!(unit.contains("GIT_SSH_COMMAND=ssh -i %d/builder-ssh-key"), "{unit}");
    assert!(unit.contains("-openssh/bin"), "no ssh on the unit's PATH:\n{unit}");
    check_rendered_toml(toml);
    // A key given as a path literal would be copied into the store: refused.
    let err = eval_module(&format!(
        r#"{{ services.hearth = {{ enable = true; {PACKAGE}
            builder = {{ enable = true; natsUrl = "nats://n:4222"; nkeySeedFile = "/run/secrets/k"; sshKeyFile = ./deploy-key;
              repos = [ {{ name = "r"; url = "git+ssh://h/r"; }} ]; }}; }}; }}"#
    ))
    .unwrap_err();
    assert!(err.contains("sshKeyFile") || err.contains("outside the store"), "{err}");
}

#[test]
fn a_read_through_cache_shows_the_fleet_with_a_reader_key_and_never_beside_a_builder() {
    let fleet =
        r#"fleet = { enable = true; natsUrl = "nats://nats:4222"; nkeySeedFile = "/run/secrets/reader.nkey"; };"#;
    let v = eval_module(&format!(r#"{{ services.hearth = {{ enable = true; {PACKAGE} {fleet} }}; }}"#)).unwrap();
    assert_eq!(v["failedAssertions"], serde_json::json!([]));
    let unit = service(&v, "hearth");
    assert!(unit.contains("LoadCredential=fleet-nkey:/run/secrets/reader.nkey\n"), "{unit}");
    let toml = v["toml"].as_str().unwrap();
    assert!(
        toml.contains("[fleet]") && toml.contains("nkey_seed_file = \"/run/credentials/hearth.service/fleet-nkey\""),
        "{toml}"
    );
    check_rendered_toml(toml);
    let v = eval_module(&format!(r#"{{ services.hearth = {{ enable = true; {PACKAGE} {fleet} {FULL_BUILDER} }}; }}"#))
        .unwrap();
    assert!(
        v["failedAssertions"].to_string().contains("services.hearth.fleet is for a hearth without a builder"),
        "{v}"
    );
}
