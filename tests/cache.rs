//! The cache against the real Nix: a real store and daemon, hearth as a spawned binary, and the
//! real Nix client (`nix copy`, `nix store verify`) on the other end.

#![allow(clippy::unwrap_used)] // Test code: a panic is a failed test.

mod common;

use common::{Hearth, add_to_store, hash_part, nix_cmd, nix_wire, request, run_ok};

const TREE: &str = "cdnf7sl3i8vngkdz1zh3vqxzz3djw8wf";
const TREE_NAR: &str = "1952r6gshs4r8mjfmgym0zgydzpm9m55wxgzg042v6w8dy91831r";

fn test_pub() -> String {
    std::fs::read_to_string(nix_wire().join("keys/test.pub")).unwrap().trim().to_owned()
}

/// `nix copy --from <hearth> --to <dest>` of `path`, trusting `key`.
fn nix_copy(h: &Hearth, dest: &std::path::Path, key: &str, path: &str) -> std::process::Output {
    nix_cmd("nix")
        .args(["copy", "--from", &h.url(), "--to"])
        .arg(dest)
        .args(["--option", "trusted-public-keys", key, path])
        .output()
        .unwrap()
}

fn unique(tag: &str) -> Vec<u8> {
    let mut seed = [0u8; 16];
    getrandom::fill(&mut seed).unwrap();
    format!("{tag} {}\n", hex::encode(seed)).into_bytes()
}

#[test]
fn narinfo_nar_and_listing_equal_the_golden_vectors() {
    let h = Hearth::start("");
    for p in common::vectors()["paths"].as_array().unwrap() {
        let store_path = p["store_path"].as_str().unwrap();
        let hash = hash_part(store_path);
        let nar_hash = p["nar_hash_nix32"].as_str().unwrap().trim_start_matches("sha256:");

        let r = h.get(&format!("/{hash}.narinfo"));
        assert_eq!(r.status, 200);
        assert_eq!(r.header("content-type"), Some("text/x-nix-narinfo"));
        // Nix's own file:// cache writes `nar/<narhash>.nar`; ours adds `?hash=` (harmonia's shape).
        let expected = p["narinfo_compression_none"]
            .as_str()
            .unwrap()
            .replace(&format!("{nar_hash}.nar\n"), &format!("{nar_hash}.nar?hash={hash}\n"));
        assert_eq!(r.text(), expected, "{store_path}");

        let head = request(&h.addr, "HEAD", &format!("/{hash}.narinfo"), &[]);
        assert_eq!(head.status, 200);
        // RFC 9110: HEAD carries the Content-Length a GET would.
        assert_eq!(head.header("content-length"), Some(r.body.len().to_string().as_str()));

        let nar = h.get(&format!("/nar/{nar_hash}.nar?hash={hash}"));
        assert_eq!(nar.status, 200);
        assert_eq!(nar.header("content-length"), Some(p["nar_size"].to_string().as_str()));
        assert_eq!(nar.header("accept-ranges"), Some("bytes"));
        assert_eq!(nar.header("content-encoding"), None);
        assert!(nar.body == std::fs::read(nix_wire().join(p["nar_file"].as_str().unwrap())).unwrap());

        // nix-serve's URL shape serves the same bytes.
        let legacy = h.get(&format!("/nar/{hash}-{nar_hash}.nar"));
        assert_eq!(legacy.status, 200);
        assert!(legacy.body == nar.body);

        let ls = h.get(&format!("/{hash}.ls"));
        assert_eq!(ls.status, 200);
        let golden = std::fs::read_to_string(nix_wire().join(format!("nixcache-none/{hash}.ls"))).unwrap();
        assert_eq!(ls.text(), golden);
    }
}

#[test]
fn nix_copies_a_fresh_path_and_refuses_a_wrong_key() {
    let h = Hearth::start("");
    let text = String::from_utf8(unique("copy")).unwrap();
    let path = common::build_input_addressed("fresh", text.trim());
    let dest = tempfile::tempdir().unwrap();
    let out = nix_copy(&h, dest.path(), &test_pub(), &path);
    assert!(out.status.success(), "nix copy failed: {}", String::from_utf8_lossy(&out.stderr));
    let copied = dest.path().join(path.trim_start_matches('/'));
    assert_eq!(std::fs::read(&copied).unwrap(), std::fs::read(&path).unwrap());

    let other = tempfile::tempdir().unwrap();
    let out = nix_copy(&h, other.path(), "other-key-1:KVViHldcRCNu3vivAf5RgtT7/XRaHI2mk2ZTgg1XlRZ=", &path);
    assert!(!out.status.success(), "nix copy accepted a path signed by a key it does not trust");
    assert!(String::from_utf8_lossy(&out.stderr).contains("signature"), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn nix_store_verify_accepts_our_signatures() {
    let h = Hearth::start("");
    let store_path = "/nix/store/sah6ys5p5a453b5xrprp9mrssbc61147-withrefs";
    let out = nix_cmd("nix")
        .args(["store", "verify", "--store", &h.url(), "--trusted-public-keys", &test_pub(), "-r", store_path])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // And without the right key, verification fails.
    let out = nix_cmd("nix")
        .args([
            "store",
            "verify",
            "--store",
            &h.url(),
            "--trusted-public-keys",
            "x-1:KVViHldcRCNu3vivAf5RgtT7/XRaHI2mk2ZTgg1XlRZ=",
        ])
        .arg(store_path)
        .output()
        .unwrap();
    assert!(!out.status.success());
}

#[test]
fn a_broken_transfer_resumes_with_range() {
    let h = Hearth::start("");
    let full = h.get(&format!("/nar/{TREE_NAR}.nar?hash={TREE}")).body;
    assert_eq!(full.len(), 2744);
    for (start, end) in [(0usize, 0usize), (1, 7), (100, 2000), (2743, 2743), (1000, 2743)] {
        let r = request(
            &h.addr,
            "GET",
            &format!("/nar/{TREE_NAR}.nar?hash={TREE}"),
            &[("Range", &format!("bytes={start}-{end}"))],
        );
        assert_eq!(r.status, 206, "{start}-{end}");
        assert_eq!(r.header("content-range"), Some(format!("bytes {start}-{end}/2744").as_str()));
        assert!(r.body == full[start..=end], "{start}-{end}");
    }
    // A download cut at byte 1234 resumes with an open range and completes byte-exact.
    let tail = request(&h.addr, "GET", &format!("/nar/{TREE_NAR}.nar?hash={TREE}"), &[("Range", "bytes=1234-")]);
    assert_eq!(tail.status, 206);
    let mut joined = full[..1234].to_vec();
    joined.extend_from_slice(&tail.body);
    assert!(joined == full);
    let past = request(&h.addr, "GET", &format!("/nar/{TREE_NAR}.nar?hash={TREE}"), &[("Range", "bytes=2744-")]);
    assert_eq!(past.status, 416);
    assert_eq!(past.header("content-range"), Some("bytes */2744"));

    // If-Range: the NAR's own ETag resumes; any other validator gets the whole NAR.
    let url = format!("/nar/{TREE_NAR}.nar?hash={TREE}");
    let etag = h.get(&url).header("etag").unwrap().to_owned();
    let resumed = request(&h.addr, "GET", &url, &[("Range", "bytes=1234-"), ("If-Range", &etag)]);
    assert_eq!(resumed.status, 206);
    for other in ["\"something-else\"", "Wed, 21 Oct 2015 07:28:00 GMT"] {
        let whole = request(&h.addr, "GET", &url, &[("Range", "bytes=1234-"), ("If-Range", other)]);
        assert_eq!(whole.status, 200, "{other}");
        assert!(whole.body == full);
    }
}

#[test]
fn zstd_variant_is_fetched_by_nix() {
    let h = Hearth::start("[compression]\nalgorithm = \"zstd\"\nlevel = 3\n");
    let path = add_to_store("zstd.txt", &unique("zstd").repeat(1000));
    let hash = hash_part(&path);
    let narinfo = h.get(&format!("/{hash}.narinfo")).text();
    assert!(narinfo.contains("Compression: zstd\n"), "{narinfo}");
    let url = narinfo.lines().find_map(|l| l.strip_prefix("URL: ")).unwrap().to_owned();
    assert!(url.contains(".nar.zst?hash="), "{url}");
    assert!(!narinfo.contains("FileHash"), "an on-the-fly stream has no known file hash");
    let compressed = h.get(&format!("/{url}"));
    assert_eq!(compressed.status, 200);
    assert_eq!(compressed.header("content-encoding"), None);
    let nar = zstd::decode_all(compressed.body.as_slice()).unwrap();
    let size: usize = narinfo.lines().find_map(|l| l.strip_prefix("NarSize: ")).unwrap().parse().unwrap();
    assert_eq!(nar.len(), size);
    assert!(compressed.body.len() < size / 10, "zstd did not compress a repetitive file");
    // Its length is not known before it is made: neither GET nor HEAD claims one.
    assert_eq!(compressed.header("content-length"), None);
    let head = request(&h.addr, "HEAD", &format!("/{url}"), &[]);
    assert_eq!(head.status, 200);
    assert_eq!(head.header("content-length"), None, "HEAD claims a length GET does not send");

    let dest = tempfile::tempdir().unwrap();
    let out = nix_copy(&h, dest.path(), &test_pub(), &path);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // Plain NAR URLs are not served when the narinfo points to zstd? They are: both stay valid.
    let plain = h.get(&format!("/nar/{}.nar?hash={hash}", url.split('.').next().unwrap().trim_start_matches("nar/")));
    assert_eq!(plain.status, 200);
    assert!(plain.body == nar);
}

#[test]
fn hostile_and_malformed_urls_get_4xx_and_the_server_keeps_serving() {
    let h = Hearth::start("");
    let long = "a".repeat(5000);
    let cases: Vec<(String, u16)> = vec![
        ("/../../etc/passwd".into(), 404),
        ("/..%2f..%2fetc%2fpasswd".into(), 404),
        ("/%2e%2e/%2e%2e/etc/passwd".into(), 404),
        ("/nar/..%2f..%2fetc%2fpasswd".into(), 400),
        ("/nar/../../etc/passwd".into(), 404),
        ("/log/..%2f..%2fetc%2fpasswd".into(), 400),
        ("/log/../../../etc/passwd".into(), 404),
        ("/etc%2fpasswd.narinfo".into(), 400),
        ("/%00.narinfo".into(), 400),
        ("/2xr781z591fm9c9jchvf8389sr8qssz.narinfo".into(), 400),
        ("/2xr781z591fm9c9jchvf8389sr8qsszkk.narinfo".into(), 400),
        ("/2xr781z591fm9c9jchvf8389sr8qsszE.narinfo".into(), 400),
        ("/eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee.narinfo".into(), 400),
        (format!("/{long}.narinfo"), 400),
        ("/00000000000000000000000000000000.narinfo".into(), 404),
        ("/2xr781z591fm9c9jchvf8389sr8qsszk.ls%00".into(), 404),
        (format!("/nar/{TREE_NAR}.nar"), 404),
        (format!("/nar/{TREE_NAR}.nar?hash=../../etc"), 400),
        (format!("/nar/{TREE_NAR}.nar?hash=2xr781z591fm9c9jchvf8389sr8qsszk"), 404),
        (format!("/nar/{TREE_NAR}.nar.xz?hash={TREE}"), 400),
        (format!("/nar/{TREE_NAR}.nar.zst?hash={TREE}"), 404),
        (format!("/nar/{}.nar?hash={TREE}", &TREE_NAR[..51]), 400),
        ("/nar/zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz.nar".into(), 400),
        ("/log/39bvdmldxycprsns8aq5n5r1lffhp1mx-withrefs".into(), 400),
        ("/log/00000000000000000000000000000000-missing.drv".into(), 404),
        ("/realisations/sha256:zz!out.doi".into(), 400),
        (format!("/realisations/sha256:{}!out.doi", "0".repeat(64)), 404),
        ("/realisations/x/../../etc/passwd".into(), 404),
        ("/nix/store/2xr781z591fm9c9jchvf8389sr8qsszk-hello.txt".into(), 404),
        ("/nar/".into(), 404),
        ("//etc/passwd".into(), 404),
    ];
    assert!(cases.len() >= 20);
    for (target, want) in &cases {
        let r = h.get(target);
        assert_eq!(r.status, *want, "{target}");
        assert!(!r.text().contains("root:"), "{target} leaked /etc/passwd");
        assert!(!r.text().contains("/nix/store/"), "{target} leaked a path");
    }
    let post = request(&h.addr, "POST", "/nix-cache-info", &[("Content-Length", "0")]);
    assert_eq!(post.status, 405);
    assert_eq!(h.get("/nix-cache-info").status, 200);
}

#[test]
fn a_miss_is_404_not_cached_and_a_new_path_is_served_at_once() {
    let h = Hearth::start("");
    let miss = h.get("/00000000000000000000000000000000.narinfo");
    assert_eq!(miss.status, 404);
    assert_eq!(miss.header("cache-control"), Some("no-store"));
    let contents = unique("new");
    // Ask for the path first (a miss), then add it: the next request must see it.
    let path = add_to_store("new.txt", &contents);
    let hash = hash_part(&path);
    let hit = h.get(&format!("/{hash}.narinfo"));
    assert_eq!(hit.status, 200, "a just-added path was not served");
    assert!(hit.text().contains(&format!("StorePath: {path}\n")));
}

#[test]
fn the_daemon_backend_serves_the_same_narinfos() {
    let db = Hearth::start("");
    let daemon = Hearth::start("[store]\nbackend = \"daemon\"\n");
    for hash in ["sah6ys5p5a453b5xrprp9mrssbc61147", TREE, "00000000000000000000000000000000"] {
        let a = db.get(&format!("/{hash}.narinfo"));
        let b = daemon.get(&format!("/{hash}.narinfo"));
        assert_eq!(a.status, b.status, "{hash}");
        assert_eq!(a.text(), b.text(), "{hash}");
    }
    assert!(daemon.log().contains("backend=\"daemon\"") || daemon.log().contains("backend=daemon"));
    // The protocol each Nix negotiates with our client (docs/compatibility.md): 1.34 with Nix 2.8,
    // our newest (1.38, with feature negotiation) with today's Nix.
    let log = daemon.log();
    let line = log.lines().find(|l| l.contains("connected to the nix-daemon")).unwrap_or_else(|| panic!("{log}"));
    let expected = if common::nix_version() >= (2, 24) { "protocol=1.38" } else { "protocol=1.34" };
    assert!(line.contains(expected), "{line}");
}

#[test]
fn build_logs_are_served_decompressed() {
    let h = Hearth::start("");
    let r = h.get("/log/39bvdmldxycprsns8aq5n5r1lffhp1mx-withrefs.drv");
    assert_eq!(r.status, 200);
    assert!(!r.body.starts_with(b"BZh"), "the log was sent compressed");
    let expected = run_ok(nix_cmd("nix").args(["log", "/nix/store/sah6ys5p5a453b5xrprp9mrssbc61147-withrefs"]));
    assert_eq!(r.text().trim(), expected.trim());
}

#[test]
fn a_large_nar_streams_with_flat_server_memory() {
    const SIZE: usize = 256 << 20;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("big.bin");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&file).unwrap();
        let block = unique("big").repeat(1 << 16);
        let mut written = 0;
        while written < SIZE {
            let n = block.len().min(SIZE - written);
            f.write_all(&block[..n]).unwrap();
            written += n;
        }
    }
    let path = run_ok(nix_cmd("nix-store").arg("--add").arg(&file)).trim().to_owned();
    drop(dir);
    let h = Hearth::start("");
    let hash = hash_part(&path);
    let narinfo = h.get(&format!("/{hash}.narinfo")).text();
    let url = narinfo.lines().find_map(|l| l.strip_prefix("URL: ")).unwrap().to_owned();
    let (before, _) = common::memory_kib(h.pid());

    use std::io::{BufRead, BufReader, Read, Write};
    let mut s = std::net::TcpStream::connect(&h.addr).unwrap();
    write!(s, "GET /{url} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").unwrap();
    let mut r = BufReader::new(s);
    let mut line = String::new();
    let mut length = 0u64;
    loop {
        line.clear();
        r.read_line(&mut line).unwrap();
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            length = v.trim().parse().unwrap();
        }
        if line == "\r\n" {
            break;
        }
    }
    let mut total = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = r.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        total += n as u64;
    }
    assert_eq!(total, length);
    assert!(length > SIZE as u64);
    let (peak, _) = common::memory_kib(h.pid());
    let grown_mib = peak.saturating_sub(before) / 1024;
    assert!(grown_mib < 32, "peak RSS grew by {grown_mib} MiB while streaming a 256 MiB NAR");
    drop(h);
    let _ = nix_cmd("nix-store").args(["--delete", &path]).output();
}

#[test]
fn metrics_count_requests_and_nar_bytes() {
    let h = Hearth::start("");
    assert_eq!(h.get(&format!("/{TREE}.narinfo")).status, 200);
    assert_eq!(h.get(&format!("/nar/{TREE_NAR}.nar?hash={TREE}")).status, 200);
    assert_eq!(h.get("/00000000000000000000000000000000.narinfo").status, 404);
    assert_eq!(h.get(&format!("/{TREE}.ls")).status, 200);
    assert_eq!(h.get("/favicon.ico").status, 404);
    let m = h.get("/metrics").text();
    // Routes by what they serve: a narinfo hit rate can be computed.
    assert!(m.contains("hearth_http_requests_total{route=\"narinfo\",status=\"200\"} 1"), "{m}");
    assert!(m.contains("hearth_http_requests_total{route=\"narinfo\",status=\"404\"} 1"), "{m}");
    assert!(m.contains("hearth_http_requests_total{route=\"nar\",status=\"200\"} 1"), "{m}");
    assert!(m.contains("hearth_http_requests_total{route=\"ls\",status=\"200\"} 1"), "{m}");
    assert!(m.contains("hearth_http_requests_total{route=\"other\",status=\"404\"} 1"), "{m}");
    assert!(m.contains("hearth_nar_sent_bytes_total 2744"), "{m}");
    assert!(m.contains("hearth_nars_in_flight 0"), "{m}");
    assert!(m.contains("hearth_daemon_pool_size 16"), "{m}");
    assert!(m.contains("hearth_http_request_duration_seconds_bucket"), "{m}");
}

#[test]
fn serves_on_a_unix_socket_and_exits_0_on_sigterm() {
    use std::io::{BufReader, Write};
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("hearth.sock");
    let config = dir.path().join("h.toml");
    std::fs::write(&config, format!("bind = \"unix:{}\"\n", sock.display())).unwrap();
    let mut h = Hearth::start_with_config(&config, dir);
    let mut s = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    s.write_all(b"GET /nix-cache-info HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let r = common::read_response(&mut BufReader::new(s), false);
    assert_eq!(r.status, 200);
    assert!(r.text().contains("StoreDir: /nix/store"));
    assert!(h.terminate().success());
}

#[test]
fn a_unix_bind_replaces_only_a_stale_socket() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("precious");
    std::fs::write(&target, "not a socket").unwrap();
    let config = dir.path().join("h.toml");
    std::fs::write(&config, format!("bind = \"unix:{}\"\n", target.display())).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_hearth"))
        .args(["serve", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a socket"), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "not a socket", "hearth deleted a file");

    // A socket nobody listens on any more (an earlier run's) is replaced.
    let sock = dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    std::fs::write(&config, format!("bind = \"unix:{}\"\n", sock.display())).unwrap();
    let keep = tempfile::tempdir().unwrap();
    let h = Hearth::start_with_config(&config, keep);
    assert!(std::os::unix::net::UnixStream::connect(&sock).is_ok());
    drop(h);
}

#[test]
fn systemd_socket_activation_serves_on_the_passed_socket() {
    use std::io::Write;
    common::ensure_store();
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("activated.sock");
    let config = dir.path().join("h.toml");
    // `bind` names a TCP port that is never used: the passed socket wins.
    std::fs::write(&config, "bind = \"127.0.0.1:1\"\n").unwrap();
    let mut child = std::process::Command::new("systemd-socket-activate")
        .arg("-l")
        .arg(&sock)
        .arg(env!("CARGO_BIN_EXE_hearth"))
        .args(["serve", "--config"])
        .arg(&config)
        .env("NO_COLOR", "1")
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("systemd-socket-activate (Debian's systemd package)");
    common::wait_until("systemd-socket-activate to listen", std::time::Duration::from_secs(30), || sock.exists());
    let mut s = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    s.write_all(b"GET /nix-cache-info HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let r = common::read_response(&mut std::io::BufReader::new(s), false);
    assert_eq!(r.status, 200);
    assert!(r.text().contains("Priority: 30"));
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn nars_fetched_one_at_a_time_never_open_a_daemon_connection_each() {
    let h = Hearth::start("");
    let paths: Vec<String> = (0..40).map(|i| add_to_store(&format!("one-{i}"), &unique("one at a time"))).collect();
    // One keep-alive connection, as Nix's curl keeps one: narinfo, then NAR, path after path,
    // each stream ended before the next begins.
    let mut conn = std::io::BufReader::new(std::net::TcpStream::connect(&h.addr).unwrap());
    let mut get = |target: &str| {
        use std::io::Write;
        write!(conn.get_mut(), "GET {target} HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
        common::read_response(&mut conn, false)
    };
    for p in &paths {
        let narinfo = get(&format!("/{}.narinfo", hash_part(p)));
        assert_eq!(narinfo.status, 200);
        let url = narinfo.text().lines().find_map(|l| l.strip_prefix("URL: ").map(str::to_owned)).unwrap();
        let nar = get(&format!("/{url}"));
        assert_eq!(nar.status, 200);
        let size: usize = narinfo.text().lines().find_map(|l| l.strip_prefix("NarSize: ")?.parse().ok()).unwrap();
        assert_eq!(nar.body.len(), size);
    }
    // The first connection and the spare opened beside it, not one per NAR.
    let opened = h.metric("hearth_daemon_temp_root_connections_total");
    assert!(opened <= 3.0, "{opened} daemon connections for 40 NARs");
    let _ = nix_cmd("nix-store").arg("--delete").args(&paths).output();
}
