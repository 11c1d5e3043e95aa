//! Shared test harness: the real Nix store, a spawned `hearth` binary, and a raw HTTP client that
//! sends bytes exactly as written (so hostile URLs reach the server unnormalised).

#![allow(dead_code, unreachable_pub)]

pub mod builder;
pub mod flake;
pub mod garage;
pub mod nats;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

/// `../shared/nix-wire`, read-only.
pub fn nix_wire() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/nix-wire");
    assert!(
        p.join("vectors.json").is_file(),
        "missing {}: the shared reference material must sit beside the repo",
        p.display()
    );
    p
}

pub fn vectors() -> serde_json::Value {
    let text = std::fs::read_to_string(nix_wire().join("vectors.json")).expect("read vectors.json");
    serde_json::from_str(&text).expect("parse vectors.json")
}

/// Environment for Nix commands in tests: flakes on, no substituters from the network.
pub fn nix_cmd(program: &str) -> Command {
    let mut c = Command::new(program);
    c.env("NIX_CONFIG", "experimental-features = nix-command flakes\nsubstituters =\n");
    c
}

/// Runs a command and returns stdout; panics with stderr if it fails.
pub fn run_ok(cmd: &mut Command) -> String {
    let out =
        cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e} (scripts/test installs what tests need)"));
    assert!(out.status.success(), "{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("utf-8 output")
}

/// One path's entry in `nix path-info --json`: a list of objects with a `path` field up to Nix
/// 2.18, a map keyed by store path since Nix 2.19.
pub fn path_info_entry<'a>(info: &'a serde_json::Value, path: &str) -> &'a serde_json::Value {
    let entry = match info {
        serde_json::Value::Array(list) => list.iter().find(|e| e["path"] == path),
        serde_json::Value::Object(map) => map.get(path),
        _ => None,
    };
    entry.unwrap_or_else(|| panic!("no entry for {path} in nix path-info --json: {info}"))
}

/// Which Nix the tests run against: `(major, minor)` of `nix --version`.
pub fn nix_version() -> (u32, u32) {
    static VERSION: OnceLock<(u32, u32)> = OnceLock::new();
    *VERSION.get_or_init(|| {
        let text = run_ok(Command::new("nix").arg("--version"));
        let number = text.split_whitespace().last().unwrap_or_default();
        let mut parts = number.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
        (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
    })
}

/// Makes sure the real Nix store and daemon are there and the golden paths are in the store.
pub fn ensure_store() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        assert!(
            Path::new("/nix/var/nix/daemon-socket/socket").exists(),
            "no nix-daemon socket: run the tests through scripts/test, which installs nix-bin and starts nix-daemon"
        );
        run_ok(nix_cmd("bash").arg(nix_wire().join("make_fixtures.sh")));
    });
}

/// Adds a file with the given contents to the store and returns its store path.
pub fn add_to_store(name: &str, contents: &[u8]) -> String {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join(name);
    std::fs::write(&file, contents).expect("write");
    run_ok(nix_cmd("nix-store").arg("--add").arg(&file)).trim().to_owned()
}

/// Builds a fresh input-addressed path (a derivation with builder `/bin/sh`) holding `text`.
/// Unlike `nix-store --add` paths, these are not content-addressed, so Nix needs a signature to
/// accept them from a cache.
pub fn build_input_addressed(name: &str, text: &str) -> String {
    let expr = format!(
        "derivation {{ name = \"{name}\"; system = builtins.currentSystem; builder = \"/bin/sh\"; args = [ \"-c\" \"echo {text} > $out\" ]; }}"
    );
    run_ok(nix_cmd("nix-build").args(["--no-out-link", "-E", &expr])).trim().to_owned()
}

/// Polls `ok` until it holds; fails the test naming `what` after `within`.
pub fn wait_until(what: &str, within: Duration, ok: impl FnMut() -> bool) {
    wait_until_or(what, within, ok, String::new);
}

/// As [`wait_until`], saying `context()` (a log, say) when it times out.
pub fn wait_until_or(what: &str, within: Duration, mut ok: impl FnMut() -> bool, context: impl Fn() -> String) {
    let deadline = std::time::Instant::now() + within;
    while !ok() {
        assert!(std::time::Instant::now() < deadline, "timed out waiting for {what}\n{}", context());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// As [`wait_until`], for a condition that is asked over the network (`ok` is awaited).
pub async fn wait_until_async<F: std::future::Future<Output = bool>>(
    what: &str,
    within: Duration,
    mut ok: impl FnMut() -> F,
) {
    let deadline = std::time::Instant::now() + within;
    while !ok().await {
        assert!(std::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `n` random bytes.
pub fn random_bytes(n: usize) -> Vec<u8> {
    let mut b = vec![0u8; n];
    getrandom::fill(&mut b).expect("OS randomness");
    b
}

/// A path of `mib` MiB of random bytes (incompressible, and every test's own), and its NAR URL
/// on `h`.
pub fn big_path(h: &Hearth, mib: usize) -> (String, String) {
    let path = add_to_store("big.bin", &random_bytes(mib << 20));
    let narinfo = h.get(&format!("/{}.narinfo", hash_part(&path))).text();
    let url = narinfo.lines().find_map(|l| l.strip_prefix("URL: ")).expect("a URL line").to_owned();
    (path, format!("/{url}"))
}

pub fn hash_part(store_path: &str) -> String {
    store_path.trim_start_matches("/nix/store/")[..32].to_owned()
}

/// A running `hearth serve`, stopped with SIGTERM when dropped.
pub struct Hearth {
    pub child: Child,
    pub addr: String,
    pub stderr_log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Hearth {
    /// Starts hearth with `extra` TOML appended to a config that binds 127.0.0.1:0 and signs with
    /// the test key; waits for the "hearth serving" line and reads the bound address from it.
    pub fn start(extra: &str) -> Self {
        Self::start_env(extra, &[])
    }

    /// As [`Hearth::start`], with extra environment variables for the hearth process.
    pub fn start_env(extra: &str, env: &[(&str, &str)]) -> Self {
        ensure_store();
        let dir = tempfile::tempdir().expect("tempdir");
        let key = dir.path().join("test.sec");
        std::fs::copy(nix_wire().join("keys/test.sec"), &key).expect("copy key");
        set_mode(&key, 0o600);
        let config = dir.path().join("hearth.toml");
        // State stays in the test's own directory unless the test names one.
        let state = if extra.contains("state_dir") {
            String::new()
        } else {
            format!("state_dir = \"{}\"\n", dir.path().join("state").display())
        };
        let toml = format!("bind = \"127.0.0.1:0\"\nsign_key_paths = [\"{}\"]\n{state}{extra}\n", key.display());
        std::fs::write(&config, toml).expect("write config");
        Self::spawn(&config, dir, env)
    }

    pub fn start_with_config(config: &Path, dir: tempfile::TempDir) -> Self {
        Self::spawn(config, dir, &[])
    }

    fn spawn(config: &Path, dir: tempfile::TempDir, env: &[(&str, &str)]) -> Self {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_hearth"));
        cmd.args(["serve", "--config"])
            .arg(config)
            .env("HEARTH_LOG", "info,hearth=debug")
            .env("NO_COLOR", "1")
            // Builds in tests never reach the network's substituters.
            .env("NIX_CONFIG", "substituters =\n")
            .envs(env.iter().copied());
        Self::spawn_command(cmd, dir)
    }

    /// Runs `cmd` (a `hearth serve`, perhaps through a wrapper), reading its address from its
    /// "hearth serving" line; its log is kept in `dir`.
    pub fn spawn_command(mut cmd: Command, dir: tempfile::TempDir) -> Self {
        let log = dir.path().join("stderr.log");
        let mut child = cmd.stdout(Stdio::null()).stderr(Stdio::piped()).spawn().expect("spawn hearth");
        let stderr = child.stderr.take().expect("stderr");
        let mut reader = BufReader::new(stderr);
        let mut addr = None;
        let mut seen = String::new();
        let mut line = String::new();
        while reader.read_line(&mut line).unwrap_or(0) > 0 {
            seen.push_str(&line);
            if line.contains("hearth serving") {
                addr = line.split("listen=").nth(1).and_then(|s| s.split_whitespace().next()).map(str::to_owned);
                break;
            }
            line.clear();
        }
        let Some(addr) = addr else { panic!("hearth did not start:\n{seen}") };
        // What came before the address is in the file before this returns (a test may read the
        // startup lines at once); the rest is drained into it so the child never blocks on a
        // full pipe.
        let mut f = std::fs::File::create(&log).expect("log file");
        f.write_all(seen.as_bytes()).expect("write the log");
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut reader, &mut f);
        });
        Self { child, addr, stderr_log: log, _dir: dir }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn get(&self, path: &str) -> Response {
        request(&self.addr, "GET", path, &[])
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        self.child.wait().expect("wait hearth")
    }

    /// The value of one metric line of hearth's `/metrics`, by its name and labels.
    pub fn metric(&self, series: &str) -> f64 {
        let text = self.get("/metrics").text();
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {series} in /metrics"))
    }

    /// Waits until the builder takes requests (`hearth_builder_ready` is 1).
    pub fn wait_builder_ready(&self) {
        wait_until("the builder to take requests", Duration::from_secs(60), || {
            self.metric("hearth_builder_ready") == 1.0
        });
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr_log).unwrap_or_default()
    }

    /// Waits (up to 60 s) until the log contains `pattern` `count` times.
    pub fn wait_for_log(&self, pattern: &str, count: usize) {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while self.log().matches(pattern).count() < count {
            assert!(std::time::Instant::now() < deadline, "no `{pattern}` in hearth's log:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Hearth {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
            for _ in 0..100 {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

pub fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

/// A parsed HTTP response.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Sends one request with the target exactly as given and reads the whole response
/// (`Connection: close`).
pub fn request(addr: &str, method: &str, target: &str, headers: &[(&str, &str)]) -> Response {
    let mut raw = format!("{method} {target} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n");
    for (k, v) in headers {
        raw.push_str(&format!("{k}: {v}\r\n"));
    }
    raw.push_str("\r\n");
    raw_request(addr, raw.as_bytes(), method == "HEAD")
}

/// Sends raw bytes and parses one response.
pub fn raw_request(addr: &str, raw: &[u8], head: bool) -> Response {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(60))).expect("timeout");
    s.write_all(raw).expect("send");
    let mut r = BufReader::new(s);
    read_response(&mut r, head)
}

pub fn read_response(r: &mut impl BufRead, head: bool) -> Response {
    let mut line = String::new();
    r.read_line(&mut line).expect("status line");
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {line:?}"));
    let mut headers = Vec::new();
    loop {
        line.clear();
        r.read_line(&mut line).expect("header");
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        let (k, v) = l.split_once(':').expect("header colon");
        headers.push((k.trim().to_owned(), v.trim().to_owned()));
    }
    let mut resp = Response { status, headers, body: Vec::new() };
    if head || status == 304 || status == 204 {
        return resp;
    }
    if let Some(len) = resp.header("content-length").map(|v| v.parse::<usize>().expect("length")) {
        let mut body = vec![0; len];
        r.read_exact(&mut body).expect("body");
        resp.body = body;
    } else if resp.header("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        loop {
            line.clear();
            r.read_line(&mut line).expect("chunk size");
            let n = usize::from_str_radix(line.trim(), 16).expect("chunk size hex");
            if n == 0 {
                line.clear();
                let _ = r.read_line(&mut line);
                break;
            }
            let mut chunk = vec![0; n + 2];
            r.read_exact(&mut chunk).expect("chunk");
            resp.body.extend_from_slice(&chunk[..n]);
        }
    } else {
        r.read_to_end(&mut resp.body).expect("body");
    }
    resp
}

/// VmHWM (peak resident set) and VmRSS of a process, in KiB.
pub fn memory_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmHWM:"), field("VmRSS:"))
}
