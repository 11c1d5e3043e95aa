//! What a hostile or careless client cannot do to the cache: stalled readers that never read,
//! more NAR streams than configured, a log that expands to hundreds of MiB, stalled zstd
//! streams at the highest level. Each test fails against a server without the bound.

#![allow(clippy::unwrap_used)] // Test code: a panic is a failed test.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::{Hearth, big_path, hash_part, nix_cmd, request, wait_until};

/// How long a condition may take to come true here.
const WAIT: Duration = Duration::from_secs(90);

/// Sends a GET, reads the head (status) and `n` body bytes, and leaves the rest unread.
fn stall(addr: &str, target: &str, n: usize) -> (u16, BufReader<TcpStream>) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    write!(s, "GET {target} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").unwrap();
    let mut r = BufReader::new(s);
    let mut status = 0;
    loop {
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        if status == 0 {
            status = line.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
        }
        if line == "\r\n" || line.is_empty() {
            break;
        }
    }
    if status == 200 {
        let mut buf = vec![0u8; n];
        r.read_exact(&mut buf).unwrap();
    }
    (status, r)
}

fn threads(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task")).unwrap().count()
}

#[test]
fn stalled_readers_hold_no_thread_and_are_cut_after_the_send_timeout() {
    // Four NAR threads, forty stalled clients: with a thread held per stalled stream nothing
    // else could be streamed until they leave.
    let h =
        Hearth::start("nar_threads = 4\nmax_nar_streams = 100\nsend_timeout_seconds = 3\nclient_stream_share = 1.0\n");
    let (path, url) = big_path(&h, 48);
    let stalled: Vec<_> = (0..40).map(|_| stall(&h.addr, &url, 4096)).collect();
    assert!(stalled.iter().all(|(status, _)| *status == 200));
    assert_eq!(h.metric("hearth_nars_in_flight"), 40.0);
    assert!(threads(h.pid()) < 40, "{} threads for 40 stalled streams", threads(h.pid()));

    // A whole NAR, a listing and a narinfo are still served at once.
    let tree = "/nar/1952r6gshs4r8mjfmgym0zgydzpm9m55wxgzg042v6w8dy91831r.nar?hash=cdnf7sl3i8vngkdz1zh3vqxzz3djw8wf";
    let whole = h.get(tree);
    assert_eq!(whole.status, 200);
    let nar = common::nix_wire().join("nars/cdnf7sl3i8vngkdz1zh3vqxzz3djw8wf-tree.nar");
    assert!(whole.body == std::fs::read(nar).unwrap());
    assert_eq!(h.get("/cdnf7sl3i8vngkdz1zh3vqxzz3djw8wf.ls").status, 200);
    assert_eq!(h.get(&format!("/{}.narinfo", hash_part(&path))).status, 200);

    // After the send timeout every stalled stream is dropped while its client still holds the
    // socket: streams and temp roots are released, so the path can be collected.
    wait_until("stalled streams to be cut", WAIT, || h.metric("hearth_nars_in_flight") == 0.0);
    wait_until("the path to be deletable", WAIT, || {
        nix_cmd("nix-store").args(["--delete", &path]).output().unwrap().status.success()
    });
    // The clients see their download end short instead of hanging.
    for (_, mut r) in stalled.into_iter().take(3) {
        let mut rest = Vec::new();
        let _ = r.read_to_end(&mut rest);
        assert!(rest.len() < 48 << 20, "a stalled client got the whole NAR");
    }
}

#[test]
fn streams_beyond_the_configured_bound_get_503_with_retry_after_at_once() {
    let h = Hearth::start(
        "max_nar_streams = 5\nsend_timeout_seconds = 600\nclient_stream_share = 1.0\nstream_min_idle_seconds = 600\nstream_wait_seconds = 0\n",
    );
    let (path, url) = big_path(&h, 32);
    let held: Vec<_> = (0..5).map(|_| stall(&h.addr, &url, 4096)).collect();
    assert!(held.iter().all(|(status, _)| *status == 200));
    let r = request(&h.addr, "GET", &url, &[]);
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.header("retry-after"), Some("2"));
    // HEAD needs no stream; narinfos need none either.
    assert_eq!(request(&h.addr, "HEAD", &url, &[]).status, 200);
    assert_eq!(h.get(&format!("/{}.narinfo", hash_part(&path))).status, 200);
    drop(held);
    wait_until("a stream to be free again", WAIT, || request(&h.addr, "HEAD", "/nix-cache-info", &[]).status == 200);
    wait_until("downloads to be served again", WAIT, || h.metric("hearth_nars_in_flight") == 0.0);
    let again = h.get(&url);
    assert_eq!(again.status, 200);
    assert_eq!(again.body.len(), again.header("content-length").unwrap().parse::<usize>().unwrap());
    let _ = nix_cmd("nix-store").args(["--delete", &path]).output();
}

#[test]
fn a_log_bomb_is_streamed_with_bounded_memory() {
    // 256 MiB of log text, bzip2-compressed to a few KiB, as Nix stores logs.
    let logs = tempfile::tempdir().unwrap();
    let base = "39bvdmldxycprsns8aq5n5r1lffhp1mx-bomb.drv";
    let dir = logs.path().join("drvs").join(&base[..2]);
    std::fs::create_dir_all(&dir).unwrap();
    let plain = logs.path().join("plain");
    let line = b"building: the same line again and again, as a runaway build prints it\n";
    let mut f = std::fs::File::create(&plain).unwrap();
    let mut written = 0usize;
    while written < 256 << 20 {
        f.write_all(&line.repeat(1000)).unwrap();
        written += line.len() * 1000;
    }
    drop(f);
    let bz2 = std::fs::File::create(dir.join(format!("{}.bz2", &base[2..]))).unwrap();
    let status = std::process::Command::new("bzip2").args(["-c", "-1"]).arg(&plain).stdout(bz2).status().unwrap();
    assert!(status.success());
    std::fs::remove_file(&plain).unwrap();

    let h = Hearth::start(&format!("[store]\nlog_dir = \"{}\"\n", logs.path().display()));
    let (_, before) = common::memory_kib(h.pid());
    // Six at once, read to the end.
    let readers: Vec<_> = (0..6)
        .map(|_| {
            let addr = h.addr.clone();
            std::thread::spawn(move || {
                let (status, mut r) = stall(&addr, &format!("/log/{base}"), 0);
                assert_eq!(status, 200);
                let mut n = 0u64;
                let mut buf = vec![0u8; 1 << 16];
                loop {
                    let k = r.read(&mut buf).unwrap();
                    if k == 0 {
                        break;
                    }
                    n += k as u64;
                }
                n
            })
        })
        .collect();
    for r in readers {
        // Chunked transfer encoding adds a little framing; the text itself is all there.
        assert!(r.join().unwrap() >= written as u64);
    }
    let (peak, _) = common::memory_kib(h.pid());
    assert!(peak < before + 96 * 1024, "peak RSS {peak} KiB (from {before} KiB) for six log downloads");
}

#[test]
fn stalled_zstd_streams_at_level_19_have_bounded_memory() {
    let h = Hearth::start(
        "send_timeout_seconds = 600\nclient_stream_share = 1.0\nstream_min_idle_seconds = 600\nstream_wait_seconds = 0\n[compression]\nalgorithm = \"zstd\"\nlevel = 19\nmax_streams = 12\n",
    );
    let (path, _) = big_path(&h, 24);
    let narinfo = h.get(&format!("/{}.narinfo", hash_part(&path))).text();
    let url = format!("/{}", narinfo.lines().find_map(|l| l.strip_prefix("URL: ")).unwrap());
    assert!(url.contains(".nar.zst"), "{url}");
    let (_, before) = common::memory_kib(h.pid());
    let held: Vec<_> = (0..12).map(|_| stall(&h.addr, &url, 1024)).collect();
    assert!(held.iter().all(|(status, _)| *status == 200));
    // The thirteenth compressed stream is refused, not queued (none has been idle long enough
    // to give its slot up).
    let r = request(&h.addr, "GET", &url, &[]);
    assert_eq!(r.status, 503);
    assert!(r.header("retry-after").is_some());
    let (peak, _) = common::memory_kib(h.pid());
    eprintln!("zstd level 19: {} KiB of RSS per stalled stream", (peak - before) / 12);
    // Each encoder's window is capped: 12 streams stay far below 12 × 85 MiB.
    assert!(peak < before + 12 * 40 * 1024, "peak RSS {peak} KiB (from {before} KiB) for 12 zstd-19 streams");
    drop(held);
    let _ = nix_cmd("nix-store").args(["--delete", &path]).output();
}

/// Opens a connection from `source` (a loopback address) and sends a GET for `target` without
/// reading anything back.
fn stalled_from(addr: &str, source: std::net::Ipv4Addr, target: &str) -> TcpStream {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.bind(&std::net::SocketAddr::from((source, 0)).into()).unwrap();
    sock.connect(&addr.parse::<std::net::SocketAddr>().unwrap().into()).unwrap();
    let mut s: TcpStream = sock.into();
    write!(s, "GET {target} HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
    s
}

/// Open descriptors of a process.
fn descriptors(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count()
}

/// GETs `url` as Nix does: a 503 is retried after its `Retry-After`, up to `tries` times.
/// Returns the body and how many 503s came first.
fn get_as_nix_does(h: &Hearth, url: &str, tries: usize) -> (Vec<u8>, usize) {
    for busy in 0..tries {
        let r = h.get(url);
        if r.status == 200 {
            return (r.body, busy);
        }
        assert_eq!(r.status, 503, "{}", r.text());
        let pause: u64 = r.header("retry-after").and_then(|v| v.parse().ok()).unwrap_or(2);
        std::thread::sleep(Duration::from_secs(pause));
    }
    panic!("{url}: still 503 after {tries} tries");
}

#[test]
fn a_normal_client_gets_its_nar_while_thousands_of_sockets_stall_and_hundreds_read_slowly() {
    let h = Hearth::start("send_timeout_seconds = 600\n");
    let (path, url) = big_path(&h, 16);
    let (_, rss_before) = common::memory_kib(h.pid());
    let fds_before = descriptors(h.pid());
    // 2,000 connections from 100 addresses that ask for the NAR and never read, and 200 that
    // read 1 KiB a second: every stream slot (512) is taken, most of them by stalled sockets.
    let stalled: Vec<TcpStream> = (0..2000)
        .map(|i| stalled_from(&h.addr, std::net::Ipv4Addr::new(127, 0, 1, (i % 100) as u8 + 1), &url))
        .collect();
    let slow: Vec<TcpStream> =
        (0..200).map(|i| stalled_from(&h.addr, std::net::Ipv4Addr::new(127, 0, 2, (i % 50) as u8 + 1), &url)).collect();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut slow = slow;
            let mut buf = [0u8; 1024];
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for s in &mut slow {
                    s.set_nonblocking(true).unwrap();
                    let _ = s.read(&mut buf);
                }
                // Pacing the slow readers (1 KiB/s each), not waiting for the server.
                std::thread::sleep(Duration::from_secs(1));
            }
        })
    };
    wait_until("every stream slot to be held", WAIT, || h.metric("hearth_nars_in_flight") >= 512.0);

    // The normal client gets the whole NAR, as Nix would fetch it (503s are retried).
    let (body, busy) = get_as_nix_does(&h, &url, 15);
    assert_eq!(body.len() as u64, nar_size(&h, &path), "a short NAR");
    let (peak, _) = common::memory_kib(h.pid());
    let fds = descriptors(h.pid());
    eprintln!(
        "2,000 stalled + 200 slow: NAR after {busy} 503s; RSS {} -> peak {peak} KiB; {fds_before} -> {fds} descriptors; {} evictions",
        rss_before,
        h.metric("hearth_stream_evictions_total{bound=\"nar\"}")
    );
    assert!(h.metric("hearth_stream_evictions_total{bound=\"nar\"}") >= 1.0);
    assert!(h.metric("hearth_nars_in_flight") <= 512.0);
    // Streams stay bounded, so memory does; descriptors are the connections and a few per stream.
    assert!(peak < rss_before + 200 * 1024, "peak RSS {peak} KiB from {rss_before} KiB");
    assert!(fds < fds_before + 2200 + 3 * 512, "{fds} descriptors");
    // And so does a real Nix client.
    let store = tempfile::tempdir().unwrap();
    let copy = nix_cmd("nix")
        .args(["copy", "--no-check-sigs", "--from", &format!("http://{}", h.addr), "--to"])
        .arg(store.path())
        .arg(&path)
        .output()
        .unwrap();
    assert!(copy.status.success(), "nix copy: {}", String::from_utf8_lossy(&copy.stderr));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    reader.join().unwrap();
    drop(stalled);
    let _ = nix_cmd("nix-store").args(["--delete", &path]).output();
}

fn nar_size(h: &Hearth, path: &str) -> u64 {
    let narinfo = h.get(&format!("/{}.narinfo", hash_part(path))).text();
    narinfo.lines().find_map(|l| l.strip_prefix("NarSize: ")).unwrap().parse().unwrap()
}

#[test]
fn sixteen_idle_sockets_do_not_stop_compressed_substitution() {
    let h = Hearth::start("send_timeout_seconds = 600\n[compression]\nalgorithm = \"zstd\"\nlevel = 3\n");
    let (path, _) = big_path(&h, 16);
    let narinfo = h.get(&format!("/{}.narinfo", hash_part(&path))).text();
    let url = format!("/{}", narinfo.lines().find_map(|l| l.strip_prefix("URL: ")).unwrap());
    // Sixty-four idle requests for a `.nar.zst` from eight addresses: every compressed slot (16).
    let idle: Vec<TcpStream> =
        (0..64).map(|i| stalled_from(&h.addr, std::net::Ipv4Addr::new(127, 0, 3, (i % 8) as u8 + 1), &url)).collect();
    wait_until("every compressed slot to be held", WAIT, || h.metric("hearth_nars_in_flight") >= 16.0);
    let (body, _) = get_as_nix_does(&h, &url, 15);
    assert_eq!(zstd::decode_all(&body[..]).unwrap().len() as u64, nar_size(&h, &path));
    assert!(h.metric("hearth_stream_evictions_total{bound=\"zstd\"}") >= 1.0);
    drop(idle);
    let _ = nix_cmd("nix-store").args(["--delete", &path]).output();
}

#[test]
fn log_downloads_have_a_bound_and_idle_ones_cannot_hold_it() {
    // A 64 MiB log, bzip2-compressed, as Nix keeps it.
    let logs = tempfile::tempdir().unwrap();
    let base = "39bvdmldxycprsns8aq5n5r1lffhp1mx-loud.drv";
    let dir = logs.path().join("drvs").join(&base[..2]);
    std::fs::create_dir_all(&dir).unwrap();
    let plain = dir.join(&base[2..]);
    let mut f = std::fs::File::create(&plain).unwrap();
    for i in 0..(64 << 20) / 64 {
        writeln!(f, "{i:020} a line of build output, varied enough {}", i % 7).unwrap();
    }
    drop(f);
    let status = std::process::Command::new("bzip2").args(["-1"]).arg(&plain).status().unwrap();
    assert!(status.success());
    let h = Hearth::start(&format!("send_timeout_seconds = 600\n[store]\nlog_dir = \"{}\"\n", logs.path().display()));
    let (_, before) = common::memory_kib(h.pid());
    // 300 requests for it that never read, from 30 addresses.
    let idle: Vec<TcpStream> = (0..300)
        .map(|i| stalled_from(&h.addr, std::net::Ipv4Addr::new(127, 0, 4, (i % 30) as u8 + 1), &format!("/log/{base}")))
        .collect();
    wait_until("every log slot to be held", WAIT, || h.metric("hearth_streams_held{bound=\"log\"}") >= 32.0);
    // A NAR is still served whole, and so is the log itself to a client that reads it.
    let (_, url) = big_path(&h, 8);
    assert_eq!(h.get(&url).status, 200);
    let (log, _) = get_as_nix_does(&h, &format!("/log/{base}"), 15);
    assert!(log.len() > 60 << 20, "{} bytes of log", log.len());
    let (peak, _) = common::memory_kib(h.pid());
    eprintln!("300 idle log downloads: peak RSS {peak} KiB from {before} KiB");
    // 32 log streams at most (each a bzip2 decoder, about 3.5 MiB), not 300.
    assert!(peak < before + 32 * 5 * 1024, "peak RSS {peak} KiB from {before} KiB");
    drop(idle);
}

/// Responses with status 503 hearth has sent, on every route.
fn busy_replies(h: &Hearth) -> f64 {
    let text = h.get("/metrics").text();
    text.lines()
        .filter(|l| l.starts_with("hearth_http_requests_total{") && l.contains("status=\"503\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn one_client_holds_the_whole_uncontended_compressed_bound_and_waits_beyond_it() {
    // Default bounds (16 compressed streams, a quarter per client), with stalled readers.
    let h = Hearth::start(
        "send_timeout_seconds = 600\nstream_min_idle_seconds = 600\nstream_wait_seconds = 1\n[compression]\nalgorithm = \"zstd\"\n",
    );
    // With zstd on, the narinfo's URL (the one big_path gives) is the compressed NAR: random
    // bytes, larger than loopback's socket buffers can take, so a stalled stream stays held.
    let (path, url) = big_path(&h, 32);
    assert!(url.contains(".nar.zst"), "{url}");
    // Sixteen at once from one address, as a Nix with 16 substitution jobs asks: all served.
    let held: Vec<_> = (0..16).map(|_| stall(&h.addr, &url, 1024)).collect();
    let statuses: Vec<u16> = held.iter().map(|(s, _)| *s).collect();
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert_eq!(busy_replies(&h), 0.0);
    // The seventeenth waits its bounded while for a slot, then is told to come back.
    let r = request(&h.addr, "GET", &url, &[]);
    assert_eq!(r.status, 503);
    // A slot freed while a request waits is its.
    let waiting = {
        let (addr, url) = (h.addr.clone(), url.clone());
        std::thread::spawn(move || request(&addr, "GET", &url, &[]))
    };
    wait_until("the request to wait", WAIT, || h.log().contains("waits for a stream slot"));
    drop(held);
    let r = waiting.join().unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let _ = nix_cmd("nix-store").args(["--delete", &path]).output();
}

#[test]
fn nix_substitutes_a_300_path_closure_with_16_jobs_from_a_default_zstd_cache_without_a_503() {
    let h = Hearth::start("[compression]\nalgorithm = \"zstd\"\n");
    // 300 text paths of 96 KiB each (hex: half compressible) under one top path.
    let salt = hex::encode(common::random_bytes(8));
    let chunk = hex::encode(common::random_bytes(48 << 10));
    let expr = format!(
        "let deps = builtins.genList (i: builtins.toFile \"dep-${{toString i}}\" \"{salt} ${{toString i}} {chunk}\") 300; \
         in builtins.toFile \"top-{salt}\" (builtins.concatStringsSep \"\\n\" deps)"
    );
    let top = common::run_ok(nix_cmd("nix-instantiate").args(["--eval", "--read-write-mode", "--json", "-E", &expr]));
    let top = top.trim().trim_matches('"').to_owned();
    let closure = common::run_ok(nix_cmd("nix-store").args(["-qR", &top]));
    assert_eq!(closure.lines().count(), 301);
    let dest = tempfile::tempdir().unwrap();
    let key = std::fs::read_to_string(common::nix_wire().join("keys/test.pub")).unwrap();
    let out = nix_cmd("nix-store")
        .args(["-r", &top, "--store"])
        .arg(dest.path())
        .args(["--option", "substituters", &h.url(), "--option", "trusted-public-keys", key.trim()])
        .args(["--option", "max-jobs", "16", "--option", "http-connections", "25"])
        // Nix ≥ 2.15 (older ones say the setting is unknown, and run max-jobs at once).
        .args(["--option", "max-substitution-jobs", "16"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(dest.path().join(top.trim_start_matches('/')).exists());
    assert_eq!(busy_replies(&h), 0.0, "a host substituting its closure was turned away");
    let _ = nix_cmd("nix-store").arg("--delete").args(closure.lines()).output();
}
