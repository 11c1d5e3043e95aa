//! Reliability and security of the cache: hostile HTTP, idle and slow connections, aborted
//! downloads that must free everything, a nix-daemon that dies and comes back, garbage collection
//! during a download, SIGTERM with downloads in flight, and keys that must never leak.

#![allow(clippy::unwrap_used)] // Test code: a panic is a failed test.

mod common;

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command};
use std::time::Duration;

use common::{Hearth, big_path, hash_part, nix_cmd, nix_wire, raw_request, request, wait_until};

/// How long a condition may take to come true here.
const WAIT: Duration = Duration::from_secs(60);

const TREE: &str = "cdnf7sl3i8vngkdz1zh3vqxzz3djw8wf";
const TREE_NAR: &str = "1952r6gshs4r8mjfmgym0zgydzpm9m55wxgzg042v6w8dy91831r";

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count()
}

/// Starts a GET and reads the head and `n` body bytes; the rest waits in the socket.
fn start_download(addr: &str, target: &str, n: usize) -> (BufReader<TcpStream>, u64) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    write!(s, "GET {target} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").unwrap();
    let mut r = BufReader::new(s);
    let mut len = 0;
    loop {
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            len = v.trim().parse().unwrap();
        }
        if line == "\r\n" {
            break;
        }
    }
    let mut buf = vec![0u8; n];
    r.read_exact(&mut buf).unwrap();
    (r, len)
}

#[test]
fn hostile_http_gets_4xx_and_the_server_keeps_serving() {
    let h = Hearth::start("");
    let long_url = format!("/{}.narinfo", "a".repeat(100_000));
    let r = request(&h.addr, "GET", &long_url, &[]);
    assert!((400..500).contains(&r.status), "long URL: {}", r.status);
    let huge_header = "x".repeat(1 << 20);
    let mut s = TcpStream::connect(&h.addr).unwrap();
    let _ = write!(s, "GET /nix-cache-info HTTP/1.1\r\nHost: t\r\nX-Big: {huge_header}\r\n\r\n");
    let mut head = String::new();
    let _ = BufReader::new(s).read_line(&mut head);
    assert!(head.is_empty() || head.contains(" 431 ") || head.contains(" 400 "), "huge header: {head}");

    let nar = format!("/nar/{TREE_NAR}.nar?hash={TREE}");
    for (range, status) in
        [("bytes=0-1,5-6", 200), ("bytes=10-5", 200), ("bytes=99999-", 416), ("bytes=-0", 416), ("pages=1-2", 200)]
    {
        assert_eq!(request(&h.addr, "GET", &nar, &[("Range", range)]).status, status, "{range}");
    }
    for method in ["POST", "PUT", "DELETE", "PATCH", "OPTIONS"] {
        let r = request(&h.addr, method, "/nix-cache-info", &[("Content-Length", "0")]);
        assert_eq!(r.status, 405, "{method}");
    }
    assert_eq!(request(&h.addr, "TRACE", "/nix-cache-info", &[]).status, 405);

    // HTTP/1.0: answered, then closed.
    let r = raw_request(&h.addr, b"GET /nix-cache-info HTTP/1.0\r\n\r\n", false);
    assert_eq!(r.status, 200);
    // Pipelining: two requests in one write, two answers in order.
    let mut s = TcpStream::connect(&h.addr).unwrap();
    s.write_all(format!("GET /{TREE}.narinfo HTTP/1.1\r\nHost: t\r\n\r\nGET /00000000000000000000000000000000.narinfo HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").as_bytes()).unwrap();
    let mut r = BufReader::new(s);
    assert_eq!(common::read_response(&mut r, false).status, 200);
    assert_eq!(common::read_response(&mut r, false).status, 404);
    // Garbage instead of HTTP.
    let mut s = TcpStream::connect(&h.addr).unwrap();
    let _ = s.write_all(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 not http at all\r\n\r\n");
    let mut head = String::new();
    let _ = BufReader::new(s).read_line(&mut head);
    assert!(head.is_empty() || head.contains(" 400 "), "garbage: {head}");
    assert_eq!(h.get("/nix-cache-info").status, 200);
}

#[test]
fn a_thousand_idle_connections_do_not_stop_a_real_client_and_slow_ones_are_cut() {
    let h = Hearth::start("header_timeout_seconds = 2\n");
    let mut idle = Vec::new();
    for i in 0..1000 {
        let mut s = TcpStream::connect(&h.addr).unwrap();
        if i % 2 == 0 {
            // Slowloris: a request line, then nothing.
            s.write_all(b"GET /nix-cache-info HTTP/1.1\r\nHost: t\r\n").unwrap();
        }
        idle.push(s);
    }
    let r = h.get(&format!("/{TREE}.narinfo"));
    assert_eq!(r.status, 200);
    // The header timeout closes them: reads see EOF (or a 408) instead of hanging.
    for s in idle.iter_mut().step_by(50) {
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut buf = [0u8; 256];
        let n = s.read(&mut buf).unwrap_or(0);
        let text = String::from_utf8_lossy(&buf[..n]);
        assert!(n == 0 || text.contains(" 408 "), "an idle connection got {text:?}");
    }
    assert_eq!(h.get("/nix-cache-info").status, 200);
}

#[test]
fn the_connection_cap_refuses_extra_connections_without_hurting_served_ones() {
    let h = Hearth::start("max_connections = 50\nheader_timeout_seconds = 60\n");
    let held: Vec<TcpStream> = (0..50).map(|_| TcpStream::connect(&h.addr).unwrap()).collect();
    // The 51st is accepted by the kernel and closed by hearth.
    wait_until("the cap to close a new connection", WAIT, || {
        let mut s = TcpStream::connect(&h.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = s.write_all(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n");
        let mut buf = [0u8; 16];
        match s.read(&mut buf) {
            Ok(0) => true,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                panic!("a connection past the cap hung for 5 s instead of being closed")
            }
            Err(e) => matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted),
            // Served: the held connections were not all taken yet.
            Ok(_) => false,
        }
    });
    drop(held);
    wait_until("service after the idle connections left", WAIT, || {
        std::panic::catch_unwind(|| request(&h.addr, "GET", "/health", &[]).status).ok() == Some(200)
    });
}

#[test]
fn a_thousand_aborted_downloads_free_everything() {
    let h = Hearth::start("");
    let (path, url) = big_path(&h, 64);
    // Warm up, then take the baseline.
    drop(start_download(&h.addr, &url, 1));
    wait_until("no NARs in flight", WAIT, || h.metric("hearth_nars_in_flight") == 0.0);
    let fds_before = open_fds(h.pid());
    for _ in 0..20 {
        let batch: Vec<_> = (0..50).map(|_| start_download(&h.addr, &url, 4096)).collect();
        drop(batch);
    }
    wait_until("every aborted stream to end", WAIT, || h.metric("hearth_nars_in_flight") == 0.0);
    // Streams, files, daemon connections (temp roots) and sockets are all released; a few fds of
    // slack cover the temp-root connection being rotated meanwhile.
    wait_until("file descriptors back to the baseline", WAIT, || open_fds(h.pid()) <= fds_before + 4);
    let (_, rss) = common::memory_kib(h.pid());
    assert!(rss < 128 * 1024, "RSS {rss} KiB after 1000 aborted downloads");
    assert_eq!(h.get(&format!("/{}.narinfo", hash_part(&path))).status, 200);
    let _ = nix_cmd("nix-store").args(["--delete", &path]).output();
}

/// A nix-daemon of this test's own (same store, private socket), so it can be killed freely.
struct PrivateDaemon {
    child: Option<Child>,
    socket: std::path::PathBuf,
}

impl PrivateDaemon {
    fn start(socket: &std::path::Path) -> Self {
        let _ = std::fs::remove_file(socket);
        let child = Command::new("nix-daemon")
            .env("NIX_DAEMON_SOCKET_PATH", socket)
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        wait_until("the private daemon's socket", WAIT, || socket.exists());
        PrivateDaemon { child: Some(child), socket: socket.to_owned() }
    }

    /// Kills the daemon and its per-connection workers, as a service restart does.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("pkill").args(["-KILL", "-P", &c.id().to_string()]).status();
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

impl Drop for PrivateDaemon {
    fn drop(&mut self) {
        self.kill();
    }
}

#[test]
fn a_daemon_outage_is_503_with_retry_after_never_404_and_service_resumes() {
    common::ensure_store();
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("daemon.sock");
    let mut daemon = PrivateDaemon::start(&socket);
    let h = Hearth::start(&format!("daemon_socket = \"{}\"\n[store]\nbackend = \"daemon\"\n", socket.display()));
    let narinfo = format!("/{TREE}.narinfo");
    let nar = format!("/nar/{TREE_NAR}.nar?hash={TREE}");
    assert_eq!(h.get(&narinfo).status, 200);
    assert_eq!(h.get(&nar).status, 200);

    daemon.kill();
    // The cached path info may still answer narinfos; a path never seen needs the daemon.
    let unseen = h.get("/sah6ys5p5a453b5xrprp9mrssbc61147.narinfo");
    assert_eq!(unseen.status, 503, "{}", unseen.text());
    assert!(unseen.header("retry-after").is_some());
    let nar_down = h.get(&nar);
    assert_eq!(nar_down.status, 503, "a NAR needs a temp root");
    assert!(nar_down.header("retry-after").is_some());

    let _daemon = PrivateDaemon::start(&socket);
    assert_eq!(h.get("/sah6ys5p5a453b5xrprp9mrssbc61147.narinfo").status, 200);
    let again = h.get(&nar);
    assert_eq!(again.status, 200);
    assert!(again.body == std::fs::read(nix_wire().join(format!("nars/{TREE}-tree.nar"))).unwrap());
}

#[test]
fn garbage_collection_cannot_take_a_path_mid_download_and_a_collected_path_is_404() {
    let h = Hearth::start("");
    let (path, url) = big_path(&h, 32);
    let (mut r, len) = start_download(&h.addr, &url, 1 << 20);
    // The temp root keeps it: deleting fails while the download runs.
    let out = nix_cmd("nix-store").args(["--delete", &path]).output().unwrap();
    assert!(!out.status.success(), "the path was deleted mid-download");
    let mut rest = Vec::new();
    r.read_to_end(&mut rest).unwrap();
    assert_eq!(rest.len() as u64 + (1 << 20), len, "the download did not complete");
    drop(r);

    // Once nothing holds it, it can be collected, and then it is a 404 (not a stale hit).
    wait_until("the path to be deletable", WAIT, || {
        nix_cmd("nix-store").args(["--delete", &path]).output().unwrap().status.success()
    });
    assert_eq!(h.get(&format!("/{}.narinfo", hash_part(&path))).status, 404);
    assert_eq!(h.get(&url).status, 404);
}

#[test]
fn sigterm_lets_a_download_in_flight_finish_and_exits_0() {
    let mut h = Hearth::start("shutdown_grace_seconds = 60\n");
    let (path, url) = big_path(&h, 32);
    let (mut r, len) = start_download(&h.addr, &url, 4096);
    let _ = Command::new("kill").args(["-TERM", &h.pid().to_string()]).status();
    // New connections are refused once it stops accepting.
    wait_until("hearth to stop accepting", WAIT, || TcpStream::connect(&h.addr).is_err());
    let mut rest = Vec::new();
    r.read_to_end(&mut rest).unwrap();
    assert_eq!(rest.len() as u64 + 4096, len, "the in-flight download was cut");
    assert!(h.child.wait().unwrap().success());
    let _ = nix_cmd("nix-store").args(["--delete", &path]).output();
}

#[test]
fn keys_never_leak_and_a_readable_key_is_warned_about() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("open.sec");
    let secret = std::fs::read_to_string(nix_wire().join("keys/test.sec")).unwrap();
    std::fs::write(&key, &secret).unwrap();
    common::set_mode(&key, 0o644);
    let config = dir.path().join("h.toml");
    std::fs::write(&config, format!("bind = \"127.0.0.1:0\"\nsign_key_paths = [\"{}\"]\n", key.display())).unwrap();
    let h = Hearth::start_with_config(&config, dir);
    assert_eq!(h.get(&format!("/{TREE}.narinfo")).status, 200);
    let metrics = h.get("/metrics").text();
    let log = h.log();
    assert!(log.contains("readable by other users"), "{log}");
    let b64 = secret.trim().split_once(':').unwrap().1;
    for (what, text) in [("log", &log), ("metrics", &metrics)] {
        assert!(!text.contains(b64) && !text.contains(&b64[..20]), "the secret key is in the {what}");
    }
}
