//! Property tests: every parser that sees outside input returns an error (never panics, never
//! allocates what a hostile length asks for), and round trips where a renderer exists.

#![allow(clippy::unwrap_used)] // Test code: a panic is a failed test.

use hearth::builder::job::parse_request;
use hearth::http::range::{RangeDecision, decide};
use hearth::nix::http_path;
use hearth::nix::narinfo::NarInfo;
use hearth::nix::nixbase32;
use hearth::nix::store_path::{StorePath, StorePathHash};
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn url_parsers_are_total(s in ".{0,300}", q in proptest::option::of(".{0,60}")) {
        let _ = http_path::parse_narinfo(&s);
        let _ = http_path::parse_listing(&s);
        let _ = http_path::parse_nar(&s, q.as_deref());
        let _ = http_path::parse_log(&s);
        let _ = http_path::parse_realisation(&s);
        let _ = StorePath::from_basename(&s);
        let _ = StorePath::from_absolute("/nix/store", &s);
    }

    #[test]
    fn whatever_parses_as_a_store_path_is_safe(s in "[0-9a-z]{32}-[A-Za-z0-9+._?=/-]{1,40}") {
        if let Some(p) = StorePath::from_basename(&s) {
            let name = p.name();
            prop_assert!(!name.contains('/') && !name.starts_with('.'));
            prop_assert_eq!(p.to_string(), s);
        }
    }

    #[test]
    fn nixbase32_round_trips(bytes in proptest::array::uniform32(any::<u8>())) {
        let enc = nixbase32::encode(&bytes);
        prop_assert_eq!(enc.len(), 52);
        prop_assert_eq!(nixbase32::decode_fixed::<32>(enc.as_bytes()), Some(bytes));
    }

    #[test]
    fn nixbase32_decoding_is_total(s in proptest::collection::vec(any::<u8>(), 0..80)) {
        let _ = nixbase32::decode_fixed::<32>(&s);
        let _ = nixbase32::decode_fixed::<20>(&s);
        let _ = StorePathHash::parse(&s);
    }

    #[test]
    fn narinfo_parsing_is_total(s in "(?s).{0,600}") {
        let _ = NarInfo::parse(&s);
    }

    #[test]
    fn narinfo_round_trips(
        name in "[a-z][a-z0-9-]{0,20}",
        size in 1u64..u64::MAX,
        refs in proptest::collection::vec("[0-9a-df-np-sv-z]{32}-[a-z]{1,8}", 0..4),
        deriver in proptest::option::of("[0-9a-df-np-sv-z]{32}-[a-z]{1,8}\\.drv"),
        sigs in proptest::collection::vec("[a-z]{1,8}-1:[A-Za-z0-9+/]{86}==", 0..3),
    ) {
        let info = NarInfo {
            store_path: format!("/nix/store/2xr781z591fm9c9jchvf8389sr8qsszk-{name}"),
            url: "nar/x.nar".into(),
            compression: "none".into(),
            file_hash: None,
            file_size: None,
            nar_hash: "sha256:14ml5q1qvx7y3d0n2d1n0j2gdj4s0z54pfj6iwvgnn038ipybsgd".into(),
            nar_size: size,
            references: refs,
            deriver,
            system: None,
            sigs,
            ca: None,
        };
        prop_assert_eq!(NarInfo::parse(&info.to_string()), Some(info));
    }

    #[test]
    fn range_decisions_stay_inside_the_body(h in "(?s).{0,40}", size in 0u64..10_000) {
        match decide(Some(h.as_bytes()), size) {
            RangeDecision::Partial { start, end } => prop_assert!(start < end && end <= size),
            RangeDecision::Full | RangeDecision::Unsatisfiable => {}
        }
    }

    #[test]
    fn range_numbers(a in any::<u64>(), b in any::<u64>(), size in 0u64..u64::MAX) {
        for h in [format!("bytes={a}-{b}"), format!("bytes={a}-"), format!("bytes=-{b}")] {
            if let RangeDecision::Partial { start, end } = decide(Some(h.as_bytes()), size) {
                prop_assert!(start < end && end <= size);
            }
        }
    }

    #[test]
    fn build_requests_never_panic(subject in ".{0,60}", body in proptest::collection::vec(any::<u8>(), 0..300)) {
        let _ = parse_request(&subject, &body, |r| r == "fleet");
    }

    #[test]
    fn accepted_build_requests_only_carry_safe_names(
        target in ".{0,30}", branch in proptest::option::of(".{0,30}"), reply in ".{0,40}",
    ) {
        let body = serde_json::json!({"repo": "fleet", "target": target, "branch": branch, "reply_to": reply});
        let subject = format!("build.fleet.{target}");
        if let Ok(req) = parse_request(&subject, body.to_string().as_bytes(), |r| r == "fleet") {
            prop_assert!(req.target == "all" || req.target.bytes().all(|c| c.is_ascii_alphanumeric() || b"._-".contains(&c)));
            prop_assert!(!req.target.starts_with('-'));
            if let Some(b) = req.branch {
                prop_assert!(!b.starts_with('-') && !b.contains(".."));
            }
            prop_assert!(req.reply_to.unwrap().starts_with("build.responses."));
        }
    }
}

/// A fake daemon that completes the handshake and then answers every request with `reply`.
fn fake_daemon(reply: Vec<u8>) -> (tempfile::TempDir, std::path::PathBuf, std::thread::JoinHandle<()>) {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("socket");
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let handle = std::thread::spawn(move || {
        if let Ok((mut s, _)) = listener.accept() {
            let mut buf = [0u8; 8];
            let _ = s.read_exact(&mut buf); // magic
            let mut hello = Vec::new();
            hello.extend_from_slice(&0x6478_696fu64.to_le_bytes());
            hello.extend_from_slice(&((1u64 << 8) | 34).to_le_bytes());
            let _ = s.write_all(&hello);
            let mut client = [0u8; 24];
            let _ = s.read_exact(&mut client); // version, affinity, reserve
            let mut rest = Vec::new();
            rest.extend_from_slice(&3u64.to_le_bytes());
            rest.extend_from_slice(b"2.8\0\0\0\0\0");
            rest.extend_from_slice(&0x616c_7473u64.to_le_bytes());
            let _ = s.write_all(&rest);
            let mut req = [0u8; 64];
            let _ = s.read(&mut req);
            let _ = s.write_all(&reply);
        }
    });
    (dir, sock, handle)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    /// Garbage, truncated replies, bad tags and huge lengths from the daemon are errors.
    #[test]
    fn daemon_replies_never_panic(mut reply in proptest::collection::vec(any::<u8>(), 0..200), huge in any::<bool>()) {
        if huge {
            // STDERR_LAST, valid=1, then a deriver string claiming an absurd length.
            let mut r = 0x616c_7473u64.to_le_bytes().to_vec();
            r.extend_from_slice(&1u64.to_le_bytes());
            r.extend_from_slice(&(u64::MAX / 2).to_le_bytes());
            reply = r;
        }
        let (_dir, sock, handle) = fake_daemon(reply);
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let result = rt.block_on(async {
            let mut c = hearth::store::daemon::Connection::connect(&sock).await?;
            c.query_path_info("/nix/store/2xr781z591fm9c9jchvf8389sr8qsszk-hello.txt").await
        });
        if huge {
            prop_assert!(result.is_err());
        }
        drop(rt);
        handle.join().unwrap();
    }
}
