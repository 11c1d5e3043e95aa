//! Hot NARs: the on-disk store of serialized (and compressed) NARs. Entries equal the NAR byte
//! for byte, a fill whose NarHash does not match is refused, a collected path is a 404 and a
//! rebuilt one is never served stale, eviction keeps the bound, a restart keeps the index,
//! ranges work, and the real Nix substitutes from cached zstd entries.

#![allow(clippy::unwrap_used)] // Test code: a panic is a failed test.

mod common;

use std::io::Read;
use std::time::Duration;

use common::{Hearth, hash_part, nix_cmd, random_bytes, request, run_ok, wait_until};

/// How long a condition may take to come true here.
const WAIT: Duration = Duration::from_secs(120);
use sha2::{Digest, Sha256};

/// A cache config with a hot-NAR store in `dir`.
fn config(dir: &std::path::Path, max_size: &str, zstd: bool) -> String {
    let compression = if zstd { "[compression]\nalgorithm = \"zstd\"\nlevel = 3\n" } else { "" };
    format!("{compression}[nar_cache]\ndir = \"{}\"\nmax_size = \"{max_size}\"\nlevel = 5\n", dir.display())
}

fn narinfo_field(h: &Hearth, path: &str, field: &str) -> Option<String> {
    let text = h.get(&format!("/{}.narinfo", hash_part(path))).text();
    text.lines().find_map(|l| l.strip_prefix(&format!("{field}: ")).map(str::to_owned))
}

/// Asks for `path`'s NAR twice (the second request queues a fill) and waits for the fill.
fn fill(h: &Hearth, path: &str) -> String {
    let url = format!("/{}", narinfo_field(h, path, "URL").unwrap());
    let done = h.metric("hearth_nar_cache_fills_total") + h.metric("hearth_nar_cache_fill_failures_total");
    for _ in 0..2 {
        assert_eq!(h.get(&url).status, 200);
    }
    wait_until("the fill", WAIT, || {
        h.metric("hearth_nar_cache_fills_total") + h.metric("hearth_nar_cache_fill_failures_total") > done
    });
    url
}

fn dump(path: &str) -> Vec<u8> {
    let out = nix_cmd("nix-store").args(["--dump", path]).output().unwrap();
    assert!(out.status.success());
    out.stdout
}

#[test]
fn entries_equal_the_nar_serve_ranges_and_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), "1GiB", false);
    let h = Hearth::start(&cfg);
    let path = common::add_to_store("hot.bin", &random_bytes(300_000));
    let url = fill(&h, &path);
    assert_eq!(h.metric("hearth_nar_cache_entries"), 1.0);
    let hits = h.metric("hearth_nar_cache_hits_total");
    let r = h.get(&url);
    assert_eq!(r.status, 200);
    assert!(r.body == dump(&path), "the cached NAR differs from nix-store --dump");
    assert_eq!(h.metric("hearth_nar_cache_hits_total"), hits + 1.0);
    assert!(h.metric("hearth_nar_cache_sent_bytes_total") >= r.body.len() as f64);
    let part = request(&h.addr, "GET", &url, &[("Range", "bytes=1000-1999")]);
    assert_eq!(part.status, 206);
    assert!(part.body == r.body[1000..2000]);
    assert_eq!(part.header("content-range"), Some(format!("bytes 1000-1999/{}", r.body.len()).as_str()));

    // The index is the directory: a restart serves the entry at once, without a fill.
    drop(h);
    let h = Hearth::start(&cfg);
    assert_eq!(h.metric("hearth_nar_cache_entries"), 1.0);
    assert!(h.get(&url).body == dump(&path));
    assert_eq!(h.metric("hearth_nar_cache_hits_total"), 1.0);
    assert_eq!(h.metric("hearth_nar_cache_fills_total"), 0.0);
}

#[test]
fn zstd_entries_carry_their_file_hash_and_nix_substitutes_from_them() {
    let dir = tempfile::tempdir().unwrap();
    let h = Hearth::start(&config(dir.path(), "1GiB", true));
    let path = common::build_input_addressed("hot-zstd", &hex::encode(random_bytes(16)).repeat(60));
    assert_eq!(narinfo_field(&h, &path, "FileHash"), None, "no FileHash before the entry exists");
    let url = fill(&h, &path);
    let file_hash = narinfo_field(&h, &path, "FileHash").expect("FileHash once cached");
    let file_size: usize = narinfo_field(&h, &path, "FileSize").unwrap().parse().unwrap();
    let r = h.get(&url);
    assert_eq!(r.body.len(), file_size);
    let digest = format!("sha256:{}", hearth::nix::nixbase32::encode(&Sha256::digest(&r.body)));
    assert_eq!(digest, file_hash);
    let mut nar = Vec::new();
    zstd::stream::read::Decoder::new(&r.body[..]).unwrap().read_to_end(&mut nar).unwrap();
    assert!(nar == dump(&path));

    // The real Nix substitutes it (it checks the NarHash and our signature).
    let dest = tempfile::tempdir().unwrap();
    let key = std::fs::read_to_string(common::nix_wire().join("keys/test.pub")).unwrap();
    let hits = h.metric("hearth_nar_cache_hits_total");
    run_ok(nix_cmd("nix").args(["copy", "--from", &h.url(), "--to"]).arg(dest.path()).args([
        "--option",
        "trusted-public-keys",
        key.trim(),
        &path,
    ]));
    assert_eq!(h.metric("hearth_nar_cache_hits_total"), hits + 1.0);
}

#[test]
fn a_fill_whose_nar_hash_does_not_match_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let h = Hearth::start(&config(dir.path(), "1GiB", false));
    let path = common::add_to_store("tampered.txt", b"the store says this\n");
    // Change the file on disk behind the store's back: the NAR no longer has its NarHash.
    std::fs::write(&path, b"the disk says that!\n").unwrap();
    fill(&h, &path);
    assert_eq!(h.metric("hearth_nar_cache_fill_failures_total"), 1.0);
    assert_eq!(h.metric("hearth_nar_cache_entries"), 0.0);
    let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert!(leftovers.is_empty(), "a rejected fill left {leftovers:?}");
    let _ = nix_cmd("nix-store").args(["--delete", &path]).output();
}

#[test]
fn a_collected_path_is_404_and_a_rebuilt_one_is_never_served_stale() {
    let dir = tempfile::tempdir().unwrap();
    let h = Hearth::start(&config(dir.path(), "1GiB", false));
    // An input-addressed path whose contents differ at each build: same path, new NarHash.
    let salt = hex::encode(random_bytes(8));
    let expr = format!(
        "derivation {{ name = \"flaky-{salt}\"; system = builtins.currentSystem; builder = \"/bin/sh\"; args = [ \"-c\" \"read -r x < /proc/sys/kernel/random/uuid; echo $x > $out\" ]; }}"
    );
    let build = || run_ok(nix_cmd("nix-build").args(["--no-out-link", "-E", &expr])).trim().to_owned();
    let path = build();
    let old_url = fill(&h, &path);
    assert_eq!(h.metric("hearth_nar_cache_entries"), 1.0);

    // Served and filled, the path is pinned by a temp root for a few seconds more.
    let delete = || nix_cmd("nix-store").args(["--delete", &path]).output().unwrap().status.success();
    wait_until("the served path to be collectable", Duration::from_secs(30), delete);
    assert_eq!(h.get(&old_url).status, 404, "a collected path was served from its entry");
    assert_eq!(h.get(&format!("/{}.narinfo", hash_part(&path))).status, 404);

    assert_eq!(build(), path);
    let new_url = format!("/{}", narinfo_field(&h, &path, "URL").unwrap());
    assert_ne!(new_url, old_url, "the rebuild has the same NarHash");
    let r = h.get(&new_url);
    assert_eq!(r.status, 200);
    assert!(r.body == dump(&path), "served the stale entry of the earlier build");
    assert_eq!(h.get(&old_url).status, 404);
    let _ = nix_cmd("nix-store").args(["--delete", &path]).output();
}

#[test]
fn eviction_keeps_the_size_bound() {
    let dir = tempfile::tempdir().unwrap();
    // Entries of 400 KB (an entry may take an eighth of the cache at most): ten fit in 4 MiB.
    let h = Hearth::start(&config(dir.path(), "4MiB", false));
    let paths: Vec<String> =
        (0..12).map(|i| common::add_to_store(&format!("evict{i}.bin"), &random_bytes(400_000))).collect();
    for p in &paths {
        fill(&h, p);
    }
    wait_until("the last fill", WAIT, || h.metric("hearth_nar_cache_fills_total") == 12.0);
    assert!(h.metric("hearth_nar_cache_bytes") <= (4 << 20) as f64);
    assert!(h.metric("hearth_nar_cache_evictions_total") >= 2.0);
    let on_disk: u64 = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().metadata().unwrap().len()).sum();
    assert!(on_disk <= 4 << 20, "{on_disk} bytes on disk");
    // The newest are kept, and every path is still served.
    assert_eq!(h.metric("hearth_nar_cache_entries"), 10.0);
    for p in &paths {
        let url = format!("/{}", narinfo_field(&h, p, "URL").unwrap());
        assert!(h.get(&url).body == dump(p));
        let _ = nix_cmd("nix-store").args(["--delete", p]).output();
    }
}

/// The hot entry file of `path` in `dir`.
fn entry_file(dir: &std::path::Path, path: &str) -> std::path::PathBuf {
    let hash = hash_part(path);
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.file_name().unwrap().to_string_lossy().starts_with(&hash))
        .unwrap_or_else(|| panic!("no entry for {path}"))
}

#[test]
fn damaged_or_planted_entries_are_dropped_and_the_store_serves_instead() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), "1GiB", true);
    let h = Hearth::start(&cfg);
    type Damage = fn(&std::path::Path);
    let damages: [(&str, Damage); 5] = [
        ("truncated", |f| std::fs::OpenOptions::new().write(true).open(f).unwrap().set_len(100).unwrap()),
        ("deleted", |f| std::fs::remove_file(f).unwrap()),
        ("fifo", |f| {
            std::fs::remove_file(f).unwrap();
            rustix::fs::mknodat(
                rustix::fs::CWD,
                f,
                rustix::fs::FileType::Fifo,
                rustix::fs::Mode::from_raw_mode(0o600),
                0,
            )
            .unwrap();
        }),
        ("symlink", |f| {
            std::fs::remove_file(f).unwrap();
            std::os::unix::fs::symlink("/etc/passwd", f).unwrap();
        }),
        ("directory", |f| {
            std::fs::remove_file(f).unwrap();
            std::fs::create_dir(f).unwrap();
        }),
    ];
    for (n, (what, damage)) in damages.iter().enumerate() {
        let path = common::add_to_store(&format!("hot-{what}.bin"), &random_bytes(200_000));
        let url = fill(&h, &path);
        // (Another path's refill may have been the fill `fill` saw.)
        wait_until("the entry to be hot", WAIT, || narinfo_field(&h, &path, "FileHash").is_some());
        damage(&entry_file(dir.path(), &path));
        // The whole NAR still comes, from the store; the entry is gone and no longer advertised.
        let r = h.get(&url);
        assert_eq!(r.status, 200, "{what}");
        assert!(zstd::decode_all(&r.body[..]).unwrap() == dump(&path), "{what}: wrong bytes served");
        // What a narinfo advertises is what is served: nothing, or a refilled entry's bytes.
        if let Some(advertised) = narinfo_field(&h, &path, "FileHash") {
            let served = h.get(&url).body;
            let actual = format!("sha256:{}", hearth::nix::nixbase32::encode(&Sha256::digest(&served)));
            assert_eq!(advertised, actual, "{what}: the narinfo advertises a file that is not served");
        }
        h.wait_for_log("dropping a damaged NAR cache entry", n + 1);
        assert_eq!(h.get("/nix-cache-info").status, 200);
    }
    // At startup, anything but a regular file under an entry's name is skipped.
    let path = common::add_to_store("hot-planted.bin", &random_bytes(200_000));
    fill(&h, &path);
    wait_until("the entry to be hot", WAIT, || narinfo_field(&h, &path, "FileHash").is_some());
    let file = entry_file(dir.path(), &path);
    drop(h);
    std::fs::remove_file(&file).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", &file).unwrap();
    let h = Hearth::start(&cfg);
    assert_eq!(narinfo_field(&h, &path, "FileHash"), None);
    h.wait_for_log("skipping a NAR cache entry", 1);
    let url = format!("/{}", narinfo_field(&h, &path, "URL").unwrap());
    assert!(zstd::decode_all(&h.get(&url).body[..]).unwrap() == dump(&path));
}

/// Fills `path` as `fill` does and waits until it is hot (another path's fill may be the one
/// `fill` saw).
fn fill_hot(h: &Hearth, path: &str) -> String {
    let url = fill(h, path);
    wait_until("the entry to be hot", WAIT, || narinfo_field(h, path, "FileHash").is_some());
    url
}

#[test]
fn oversized_paths_head_and_range_requests_and_unused_evictions_fill_nothing() {
    // Entries of at most an eighth of 8 MiB. The fill thread takes one path at a time in
    // order, so once a later path is hot, every fill queued before it has been made.
    let dir = tempfile::tempdir().unwrap();
    let h = Hearth::start(&config(dir.path(), "8MiB", true));
    let mib = |n: usize, name: &str| common::add_to_store(name, &random_bytes(n));
    let fills = |h: &Hearth| h.metric("hearth_nar_cache_fills_total");

    // Larger than the cache admits: two whole GETs fill nothing.
    let big = mib(2 << 20, "too-big.bin");
    let big_url = format!("/{}", narinfo_field(&h, &big, "URL").unwrap());
    // HEAD and Range requests are not "a second request".
    let small = mib(300_000, "small.bin");
    let small_url = format!("/{}", narinfo_field(&h, &small, "URL").unwrap());
    for _ in 0..2 {
        assert_eq!(h.get(&big_url).status, 200);
    }
    for _ in 0..5 {
        assert_eq!(request(&h.addr, "HEAD", &small_url, &[]).status, 200);
    }
    assert_eq!(h.get(&small_url).status, 200);
    let marker = mib(300_000, "marker.bin");
    fill_hot(&h, &marker);
    assert_eq!(fills(&h), 1.0, "something else was filled");
    assert_eq!(narinfo_field(&h, &big, "FileHash"), None);
    assert_eq!(narinfo_field(&h, &small, "FileHash"), None, "HEADs counted as a request");

    // An entry evicted before it served anyone is not filled again for a while.
    let unused = mib(900_000, "unused.bin");
    let unused_url = fill_hot(&h, &unused);
    for i in 0..9 {
        fill_hot(&h, &mib(900_000, &format!("filler{i}.bin")));
    }
    assert_eq!(narinfo_field(&h, &unused, "FileHash"), None, "not evicted");
    let before = fills(&h);
    for _ in 0..2 {
        assert_eq!(h.get(&unused_url).status, 200);
    }
    fill_hot(&h, &mib(300_000, "marker2.bin"));
    assert_eq!(fills(&h), before + 1.0, "the unused entry was filled again");
    assert_eq!(narinfo_field(&h, &unused, "FileHash"), None);
}

#[test]
fn an_entry_overwritten_in_place_is_never_sent_whole_and_is_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let h = Hearth::start(&config(dir.path(), "1GiB", true));
    let path = common::add_to_store("hot-overwritten.bin", &random_bytes(2 << 20));
    let url = fill_hot(&h, &path);
    // Same size, other bytes: only a hash can tell.
    let file = entry_file(dir.path(), &path);
    let len = std::fs::metadata(&file).unwrap().len();
    std::fs::write(&file, vec![0x5a; len as usize]).unwrap();
    // The download is cut before its last bytes: a client sees a failed transfer, never a
    // whole file that does not match the narinfo's FileHash.
    let mut s = std::net::TcpStream::connect(&h.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    std::io::Write::write_all(&mut s, format!("GET {url} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").as_bytes())
        .unwrap();
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let head_end = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    let head = String::from_utf8_lossy(&raw[..head_end]).to_lowercase();
    assert!(head.contains(&format!("content-length: {len}")), "{head}");
    assert!(((raw.len() - head_end) as u64) < len, "a damaged entry was sent whole");
    h.wait_for_log("its bytes do not match its FileHash", 1);
    // The next request is served from the store, right.
    let r = h.get(&url);
    assert!(zstd::decode_all(&r.body[..]).unwrap() == dump(&path));
}

#[test]
fn an_unchanged_entry_is_sent_without_hashing_and_a_changed_one_is_hashed_again() {
    let dir = tempfile::tempdir().unwrap();
    let h = Hearth::start(&config(dir.path(), "1GiB", true));
    let path = common::add_to_store("hot-stamped.bin", &random_bytes(300_000));
    let url = fill_hot(&h, &path);
    let file = entry_file(dir.path(), &path);
    let checks = || h.metric("hearth_nar_cache_checks_total");
    let get_whole = || {
        let r = h.get(&url);
        assert_eq!(r.status, 200);
        assert!(zstd::decode_all(&r.body[..]).unwrap() == dump(&path), "wrong bytes served");
    };
    // The kernel keeps change times in coarse ticks: a stamp stands for a check only once the
    // file's change time is settled (2 s old). Until then every whole send is hashed.
    let settled = |f: &std::path::Path| {
        use std::os::unix::fs::MetadataExt;
        let ctime = std::fs::metadata(f).unwrap().ctime();
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
        now - ctime > 3
    };
    wait_until("the entry's change time to settle", WAIT, || settled(&file));
    let before = checks();
    get_whole();
    assert_eq!(checks(), before + 1.0, "the first whole send after the fill was not hashed");
    for _ in 0..3 {
        get_whole();
    }
    assert_eq!(checks(), before + 1.0, "an unchanged, checked entry was hashed again");
    // A range is never hashed.
    let r = request(&h.addr, "GET", &url, &[("Range", "bytes=10-99")]);
    assert_eq!((r.status, r.body.len()), (206, 90));
    assert_eq!(checks(), before + 1.0);

    // Any change through the filesystem (here a chmod: same bytes) is hashed again, once.
    let mode = std::fs::metadata(&file).unwrap().permissions();
    std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    std::fs::set_permissions(&file, mode).unwrap();
    get_whole();
    assert_eq!(checks(), before + 2.0, "a changed file was sent without hashing");
    wait_until("the entry's change time to settle", WAIT, || settled(&file));
    get_whole();
    get_whole();
    assert_eq!(checks(), before + 3.0, "the changed file's new stamp was not recorded once settled");
    get_whole();
    assert_eq!(checks(), before + 3.0);

    // After a restart, the first whole send is hashed again.
    drop(h);
    let h = Hearth::start(&config(dir.path(), "1GiB", true));
    let r = h.get(&url);
    assert_eq!(r.status, 200);
    assert_eq!(h.metric("hearth_nar_cache_checks_total"), 1.0);
}
