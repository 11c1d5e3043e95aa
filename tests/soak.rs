//! A bounded soak: mixed narinfo, NAR and range load on loopback while builds run, for
//! `HEARTH_SOAK_SECONDS` (default 120). No request may get a 5xx, and memory must stay flat.

#![allow(clippy::unwrap_used)] // Test code: a panic is a failed test.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::builder::BuilderToml;
use common::nats::Nats;
use common::{hash_part, request, set_mode};

#[test]
fn mixed_load_while_building_gets_no_5xx_and_memory_stays_flat() {
    let seconds: u64 = std::env::var("HEARTH_SOAK_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(120);
    let nats = Nats::start();
    let dir = tempfile::tempdir().unwrap();
    set_mode(dir.path(), 0o755);
    let salt = common::flake::salt();
    let repo = dir.path().join("fleet");
    common::flake::make_repo(
        &repo,
        &common::flake::flake(&[
            ("a", format!("echo a {salt} > $out")),
            ("b", format!("/bin/sleep 1; echo b {salt} > $out")),
            ("c", format!("echo c {salt}; exit 1")),
        ]),
    );
    let h = BuilderToml::new(&nats, &dir.path().join("gcroots"))
        .repo("fleet", &format!("git+file://{}", repo.display()))
        .start();
    let mut block = vec![0u8; 1 << 20];
    getrandom::fill(&mut block).unwrap();
    let big = common::add_to_store("soak.bin", &block.repeat(8));
    let narinfo = h.get(&format!("/{}.narinfo", hash_part(&big))).text();
    let big_url = format!("/{}", narinfo.lines().find_map(|l| l.strip_prefix("URL: ")).unwrap());

    let stop = Arc::new(AtomicBool::new(false));
    let requests = Arc::new(AtomicU64::new(0));
    let server_errors = Arc::new(AtomicU64::new(0));
    let targets: Vec<(String, Vec<(&'static str, &'static str)>)> = vec![
        ("/cdnf7sl3i8vngkdz1zh3vqxzz3djw8wf.narinfo".into(), vec![]),
        ("/00000000000000000000000000000000.narinfo".into(), vec![]),
        (
            "/nar/1952r6gshs4r8mjfmgym0zgydzpm9m55wxgzg042v6w8dy91831r.nar?hash=cdnf7sl3i8vngkdz1zh3vqxzz3djw8wf"
                .into(),
            vec![],
        ),
        (big_url.clone(), vec![]),
        (big_url.clone(), vec![("Range", "bytes=1000000-")]),
        ("/cdnf7sl3i8vngkdz1zh3vqxzz3djw8wf.ls".into(), vec![]),
    ];
    let mut workers = Vec::new();
    for w in 0..4 {
        let (addr, stop, requests, errors, targets) =
            (h.addr.clone(), stop.clone(), requests.clone(), server_errors.clone(), targets.clone());
        workers.push(std::thread::spawn(move || {
            let mut i = w;
            while !stop.load(Ordering::Relaxed) {
                let (target, headers) = &targets[i % targets.len()];
                let r = request(&addr, "GET", target, headers);
                requests.fetch_add(1, Ordering::Relaxed);
                if r.status >= 500 {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
                i += 1;
            }
        }));
    }
    // Builds all along: `all` builds two hosts and fails one, again and again.
    let builder = {
        let (stop, url, seed) = (stop.clone(), nats.url(), nats.seed_path().to_owned());
        std::thread::spawn(move || {
            let mut builds = 0;
            while !stop.load(Ordering::Relaxed) {
                let code = std::process::Command::new(env!("CARGO_BIN_EXE_hearth"))
                    .args(["build", "fleet", "all", "--nats-url", &url, "--nkey-seed-file"])
                    .arg(&seed)
                    .output()
                    .unwrap()
                    .status
                    .code();
                assert_eq!(code, Some(1), "host c fails, a and b build");
                builds += 1;
            }
            builds
        })
    };

    let start = Instant::now();
    let warmup = Duration::from_secs(seconds.min(20) / 2);
    std::thread::sleep(warmup);
    let (_, rss_warm) = common::memory_kib(h.pid());
    std::thread::sleep(Duration::from_secs(seconds).saturating_sub(start.elapsed()));
    let (_, rss_end) = common::memory_kib(h.pid());
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().unwrap();
    }
    let builds = builder.join().unwrap();

    let total = requests.load(Ordering::Relaxed);
    eprintln!("soak: {seconds} s, {total} requests, {builds} builds, RSS {rss_warm} -> {rss_end} KiB");
    assert!(total > 100 && builds >= 1, "the soak did too little: {total} requests, {builds} builds");
    assert_eq!(server_errors.load(Ordering::Relaxed), 0, "5xx during the soak");
    assert!(rss_end < rss_warm + 24 * 1024, "memory grew from {rss_warm} to {rss_end} KiB");
    let _ = common::nix_cmd("nix-store").args(["--delete", &big]).output();
}
