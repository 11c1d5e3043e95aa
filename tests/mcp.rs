//! `hearth mcp` driven over stdio with real JSON-RPC messages (initialize, tools/list,
//! tools/call), against a real nats-server and hearth's builder and cache.

#![allow(clippy::unwrap_used)] // Test code: a panic is a failed test.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use common::builder::BuilderToml;
use common::nats::Nats;
use common::{Hearth, hash_part, set_mode};
use serde_json::{Value, json};

struct Mcp {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    next_id: u64,
}

impl Mcp {
    fn start(args: &[&str]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_hearth"))
            .arg("mcp")
            .args(args)
            .env("NO_COLOR", "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let mut m = Mcp { child, stdin, stdout, next_id: 1 };
        let init = m.call(
            "initialize",
            json!({"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "hearth-test", "version": "0"}}),
        );
        assert!(init["result"]["capabilities"]["tools"].is_object(), "{init}");
        m.send(&json!({"jsonrpc": "2.0", "method": "notifications/initialized"}));
        m
    }

    fn send(&mut self, msg: &Value) {
        writeln!(self.stdin, "{msg}").unwrap();
        self.stdin.flush().unwrap();
    }

    /// Sends a request and returns its response (skipping notifications).
    fn call(&mut self, method: &str, params: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        self.send(&json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}));
        loop {
            let mut line = String::new();
            assert!(self.stdout.read_line(&mut line).unwrap() > 0, "hearth mcp closed stdout");
            let msg: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON-RPC: {line}: {e}"));
            if msg["id"] == id {
                return msg;
            }
        }
    }

    fn tool(&mut self, name: &str, args: Value) -> Value {
        self.call("tools/call", json!({"name": name, "arguments": args}))
    }
}

impl Drop for Mcp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn text(result: &Value) -> Value {
    let t = result["result"]["content"][0]["text"].as_str().unwrap_or_else(|| panic!("no text content: {result}"));
    serde_json::from_str(t).unwrap()
}

struct Setup {
    hearth: Hearth,
    nats: Nats,
    config: std::path::PathBuf,
    gate: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

fn setup() -> Setup {
    let nats = Nats::start();
    let dir = tempfile::tempdir().unwrap();
    set_mode(dir.path(), 0o755);
    let repo = dir.path().join("fleet");
    let salt = common::flake::salt();
    // Builders run as nixbld users: they must reach the gate.
    let gate = dir.path().join("gate");
    std::fs::create_dir(&gate).unwrap();
    set_mode(&gate, 0o777);
    let g = gate.display();
    common::flake::make_repo(
        &repo,
        &common::flake::flake(&[
            ("web1", format!("echo web1 {salt} > $out")),
            ("broken", format!("echo broken {salt}; echo it broke >&2; exit 1")),
            ("gated1", format!("while [ ! -e {g}/one ]; do /bin/sleep 0.05; done; echo gated1 {salt} > $out")),
            ("gated2", format!("while [ ! -e {g}/two ]; do /bin/sleep 0.05; done; echo gated2 {salt} > $out")),
        ]),
    );
    let builder = BuilderToml::new(&nats, &dir.path().join("gcroots"))
        .repo("fleet", &format!("git+file://{}", repo.display()))
        .render();
    let config = dir.path().join("mcp.toml");
    std::fs::write(&config, &builder).unwrap();
    let hearth = common::builder::start(&builder);
    Setup { hearth, nats, config, gate, _dir: dir }
}

impl Setup {
    fn args(&self) -> Vec<String> {
        let config = self.config.to_str().unwrap().to_owned();
        let seed = self.nats.seed_path().to_str().unwrap().to_owned();
        [
            "--config",
            &config,
            "--cache-url",
            &self.hearth.url(),
            "--nats-url",
            &self.nats.url(),
            "--nkey-seed-file",
            &seed,
        ]
        .map(str::to_owned)
        .to_vec()
    }

    fn mcp(&self, extra: &[&str]) -> Mcp {
        let mut args = self.args();
        args.extend(extra.iter().map(|s| s.to_string()));
        Mcp::start(&args.iter().map(String::as_str).collect::<Vec<_>>())
    }
}

#[test]
fn a_real_mcp_client_follows_builds_longer_than_its_timeout() {
    let python = std::env::var("HEARTH_MCP_PYTHON")
        .expect("HEARTH_MCP_PYTHON is not set: scripts/test installs the MCP Python SDK and sets it");
    let s = setup();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/mcp_client.py");
    let out = Command::new(python)
        .arg(script)
        .arg(env!("CARGO_BIN_EXE_hearth"))
        .arg(&s.gate)
        .arg("--")
        .args(s.args())
        .arg("--enable-builds")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let found: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert!(found["server"].as_str().unwrap().starts_with("hearth "), "{found}");
    assert!(found["long_build_seconds"].as_f64().unwrap() > 3.0);
}

#[test]
fn without_a_config_it_says_so_instead_of_answering_wrongly() {
    let s = setup();
    let url = s.hearth.url();
    let mut m = Mcp::start(&["--cache-url", &url]);
    let repos = text(&m.tool("list_repos", json!({})));
    assert_eq!(repos["repos"], json!([]));
    assert!(repos["config"].is_null());
    assert!(repos["note"].as_str().unwrap().contains("without hearth's config"), "{repos}");
    let host = m.tool("cache_status", json!({"repo": "fleet", "host": "web1"}));
    let msg = host["error"]["message"].as_str().unwrap_or_default();
    assert!(msg.contains("without hearth's config") && !msg.contains("no successful build"), "{host}");
}

#[test]
fn lists_tools_and_repos_builds_and_checks_the_cache() {
    let s = setup();
    let mut m = s.mcp(&["--enable-builds"]);
    let tools = m.call("tools/list", json!({}));
    let names: Vec<&str> =
        tools["result"]["tools"].as_array().unwrap().iter().map(|t| t["name"].as_str().unwrap()).collect();
    for t in ["list_repos", "build", "build_status", "cache_status", "fleet", "build_log"] {
        assert!(names.contains(&t), "{names:?}");
    }

    let repos = text(&m.tool("list_repos", json!({})));
    assert_eq!(repos["repos"][0]["name"], "fleet");

    let built = m.tool("build", json!({"repo": "fleet", "target": "web1"}));
    assert_eq!(built["result"]["isError"], false, "{built}");
    let summary = text(&built);
    assert_eq!(summary["status"], "completed");
    // The assistant gets what changed on the host, to explain an update.
    assert!(summary["hosts"][0]["changes"]["paths_after"].as_u64().unwrap() >= 1, "{summary}");
    let out = summary["out_path"].as_str().unwrap().to_owned();

    let by_path = text(&m.tool("cache_status", json!({"store_path": out})));
    assert_eq!(by_path["cached"], true, "{by_path}");
    let by_host = text(&m.tool("cache_status", json!({"repo": "fleet", "host": "web1"})));
    assert_eq!(by_host["cached"], true, "{by_host}");
    assert_eq!(by_host["store_path"], out.as_str());
    let missing = text(&m.tool("cache_status", json!({"store_path": "00000000000000000000000000000000"})));
    assert_eq!(missing["cached"], false);
    assert_eq!(s.hearth.get(&format!("/{}.narinfo", hash_part(&out))).status, 200);

    // A failed build is a tool result marked as an error, with the log's tail.
    let failed = m.tool("build", json!({"repo": "fleet", "target": "broken"}));
    assert_eq!(failed["result"]["isError"], true, "{failed}");
    assert!(text(&failed)["hosts"][0]["error"].as_str().unwrap().contains("it broke"));

    // Why it failed, and the fleet as the page shows it.
    let why = text(&m.tool("build_log", json!({"repo": "fleet", "host": "broken"})));
    assert_eq!(why["status"], "failure", "{why}");
    assert!(why["error"].as_str().unwrap().contains("it broke"), "{why}");
    let fleet = text(&m.tool("fleet", json!({})));
    let hosts: Vec<&str> = fleet["hosts"].as_array().unwrap().iter().map(|h| h["host"].as_str().unwrap()).collect();
    assert!(hosts.contains(&"web1") && hosts.contains(&"broken"), "{fleet}");
    // Never built: an answer that says so (with the failure), not a protocol error.
    let never = m.tool("cache_status", json!({"repo": "fleet", "host": "broken"}));
    assert!(never["error"].is_null(), "{never}");
    let never = text(&never);
    assert_eq!(
        (never["cached"].as_bool(), never["last_build"]["status"].as_str()),
        (Some(false), Some("failure")),
        "{never}"
    );
    // Some clients send booleans as strings.
    let queued = text(&m.tool("build", json!({"repo": "fleet", "target": "web1", "wait": "false"})));
    assert_eq!(queued["state"], "running", "{queued}");
}

#[test]
fn invalid_arguments_and_disabled_builds_are_mcp_errors() {
    let s = setup();
    let mut m = s.mcp(&[]);
    // Without --enable-builds, `build` is not offered, and calling it anyway is an error.
    let tools = m.call("tools/list", json!({}));
    assert!(tools["result"]["tools"].as_array().unwrap().iter().all(|t| t["name"] != "build"), "{tools}");
    let disabled = m.tool("build", json!({"repo": "fleet", "target": "web1"}));
    assert!(!disabled["error"].is_null() || disabled["result"]["isError"] == true, "{disabled}");

    let mut m = s.mcp(&["--enable-builds"]);
    for (tool, args, needle) in [
        ("build", json!({"repo": "fleet", "target": "x; rm -rf /"}), "invalid target"),
        ("build", json!({"repo": "fleet", "target": "web1", "branch": "--upload-pack=evil"}), "branch"),
        ("build", json!({"repo": "nope", "target": "web1"}), "unknown repo"),
        ("build", json!({"target": "web1"}), "repo"),
        ("cache_status", json!({"store_path": "../../etc/passwd"}), "store path"),
        ("cache_status", json!({}), "either"),
        ("build", json!({"repo": "fleet", "target": "web1", "wait": "perhaps"}), "wait"),
    ] {
        let r = m.tool(tool, args.clone());
        // A JSON-RPC error, or (for arguments that do not fit the schema, as rmcp reports them)
        // a tool result marked as an error.
        let msg = r["error"]["message"]
            .as_str()
            .or_else(|| (r["result"]["isError"] == true).then(|| r["result"]["content"][0]["text"].as_str()).flatten())
            .unwrap_or_else(|| panic!("{tool} {args}: not an error: {r}"));
        assert!(msg.contains(needle), "{tool} {args}: {msg}");
    }
    // Still serving after all that.
    assert_eq!(text(&m.tool("list_repos", json!({})))["repos"][0]["name"], "fleet");
}

impl Mcp {
    /// The next message from the server.
    fn next(&mut self) -> Value {
        let mut line = String::new();
        assert!(self.stdout.read_line(&mut line).unwrap() > 0, "hearth mcp closed stdout");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON-RPC: {line}: {e}"))
    }
}

#[test]
fn malformed_and_oversized_messages_get_json_rpc_errors_and_the_session_goes_on() {
    let mut m = Mcp::start(&[]);
    m.stdin.write_all(b"this is not json\n").unwrap();
    m.stdin.flush().unwrap();
    let e = m.next();
    assert_eq!(e["error"]["code"], -32700, "{e}");
    assert_eq!(e["id"], Value::Null);
    m.send(&json!({"id": 41, "method": "tools/list"}));
    let e = m.next();
    assert_eq!((e["error"]["code"].as_i64(), e["id"].as_i64()), (Some(-32600), Some(41)), "{e}");
    // 64 MiB in one line: refused with an answer, not held and never left unanswered.
    let big = format!(
        "{{\"jsonrpc\":\"2.0\",\"id\":42,\"method\":\"tools/list\",\"params\":{{\"x\":\"{}\"}}}}\n",
        "x".repeat(64 << 20)
    );
    let writer = {
        use std::os::fd::AsFd;
        let mut stdin = std::fs::File::from(m.stdin.as_fd().try_clone_to_owned().unwrap());
        std::thread::spawn(move || {
            stdin.write_all(big.as_bytes()).unwrap();
            stdin.flush().unwrap();
        })
    };
    let e = m.next();
    assert_eq!(e["error"]["code"], -32600, "{e}");
    assert!(e["error"]["message"].as_str().unwrap().contains("larger than"), "{e}");
    writer.join().unwrap();
    // The session is still good.
    let tools = m.call("tools/list", json!({}));
    assert!(tools["result"]["tools"].is_array(), "{tools}");
}
