//! The pure Nix formats against the golden vectors in `../shared/nix-wire/` (made with Nix 2.8):
//! nixbase32, NAR encoding, narinfo text (all three compressions), fingerprints and signatures.

#![allow(clippy::unwrap_used)] // Test code: a panic is a failed test.

mod common;

use std::collections::BTreeMap;

use hearth::nix::nar::Node;
use hearth::nix::narinfo::{NarInfo, fingerprint};
use hearth::nix::signing::{PublicKey, SecretKey};
use hearth::nix::{nixbase32, sha256_to_nix32};
use serde_json::Value;

fn paths() -> Vec<Value> {
    common::vectors()["paths"].as_array().expect("paths").clone()
}

#[test]
fn nixbase32_matches_every_vector() {
    for case in common::vectors()["nixbase32"].as_array().expect("cases") {
        let bytes = hex::decode(case["hex"].as_str().unwrap()).unwrap();
        let nix32 = case["nix32"].as_str().unwrap();
        assert_eq!(nixbase32::encode(&bytes), nix32);
        let decoded: Vec<u8> = match bytes.len() {
            32 => nixbase32::decode_fixed::<32>(nix32.as_bytes()).unwrap().to_vec(),
            20 => nixbase32::decode_fixed::<20>(nix32.as_bytes()).unwrap().to_vec(),
            n => panic!("unexpected length {n}"),
        };
        assert_eq!(decoded, bytes);
    }
    for p in paths() {
        let hex = p["nar_sha256_hex"].as_str().unwrap();
        assert_eq!(sha256_to_nix32(&format!("sha256:{hex}")).unwrap(), p["nar_hash_nix32"].as_str().unwrap());
    }
}

fn file(contents: &[u8], executable: bool) -> Node {
    Node::Regular { executable, contents: contents.to_vec() }
}

fn dir(entries: Vec<(&str, Node)>) -> Node {
    Node::Directory(entries.into_iter().map(|(k, v)| (k.as_bytes().to_vec(), v)).collect::<BTreeMap<_, _>>())
}

/// The trees `make_fixtures.sh` adds, built in memory.
fn fixture_tree(name: &str) -> Node {
    match name {
        "hello.txt" => file(b"Hello, Nix!\n", false),
        "hello.sh" => file(b"#!/bin/sh\necho hello\n", true),
        "withrefs" => {
            let contents =
                std::fs::read(common::nix_wire().join("nars/sah6ys5p5a453b5xrprp9mrssbc61147-withrefs.nar")).unwrap();
            // The built file's contents sit at offset 96 with its size just before.
            let size = u64::from_le_bytes(contents[88..96].try_into().unwrap()) as usize;
            file(&contents[96..96 + size], false)
        }
        "tree" => dir(vec![
            ("README", file(b"tree root\n", false)),
            ("Zebra", file(b"Z\n", false)),
            ("a-b", file(b"x", false)),
            ("a.b", file(b"y", false)),
            ("alpha", file(b"a\n", false)),
            ("bin", dir(vec![("run", file(b"#!/bin/sh\nexit 0\n", true))])),
            ("empty", file(b"", false)),
            ("emptydir", dir(vec![])),
            ("link", Node::Symlink { target: b"README".to_vec() }),
            (
                "sub",
                dir(vec![
                    ("nested", dir(vec![("deep.txt", file(b"deep\n", false))])),
                    ("up", Node::Symlink { target: b"../README".to_vec() }),
                ]),
            ),
        ]),
        other => panic!("unknown fixture {other}"),
    }
}

#[test]
fn nar_encoding_is_byte_exact() {
    for p in paths() {
        let store_path = p["store_path"].as_str().unwrap();
        let name = &store_path[44..];
        let expected = std::fs::read(common::nix_wire().join(p["nar_file"].as_str().unwrap())).unwrap();
        let nar = fixture_tree(name).to_nar();
        assert_eq!(nar.len() as u64, p["nar_size"].as_u64().unwrap(), "{name}");
        assert!(nar == expected, "{name}: NAR bytes differ");
    }
}

/// A vector path's references, as basenames.
fn reference_basenames(p: &Value) -> Vec<String> {
    p["references"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap().trim_start_matches("/nix/store/").to_owned())
        .collect()
}

fn narinfo_for(p: &Value, narinfo_text: &str) -> NarInfo {
    // Take URL, compression and file hash/size from Nix's own narinfo; render everything else
    // from the path's facts.
    let nix = NarInfo::parse(narinfo_text).expect("Nix's narinfo parses");
    let store_dir = "/nix/store";
    let references = reference_basenames(p);
    let key = SecretKey::parse(common::vectors()["test_key"]["secret_key_file"].as_str().unwrap()).unwrap();
    let mut info = NarInfo {
        store_path: p["store_path"].as_str().unwrap().to_owned(),
        url: nix.url.clone(),
        compression: nix.compression.clone(),
        file_hash: nix.file_hash.clone(),
        file_size: nix.file_size,
        nar_hash: p["nar_hash_nix32"].as_str().unwrap().to_owned(),
        nar_size: p["nar_size"].as_u64().unwrap(),
        references,
        deriver: p["deriver"].as_str().map(|d| d.trim_start_matches("/nix/store/").to_owned()),
        system: None,
        sigs: vec![],
        ca: p["ca"].as_str().map(str::to_owned),
    };
    let fp = info.fingerprint(store_dir);
    info.sigs.push(key.sign(&fp));
    info
}

#[test]
fn narinfo_text_signature_and_fingerprint_are_byte_exact() {
    let public = PublicKey::parse(common::vectors()["test_key"]["public_key"].as_str().unwrap()).unwrap();
    for p in paths() {
        for field in ["narinfo_compression_none", "narinfo_compression_xz", "narinfo_compression_zstd"] {
            let expected = p[field].as_str().unwrap();
            let info = narinfo_for(&p, expected);
            assert_eq!(info.to_string(), expected, "{field} of {}", p["store_path"]);
            // Round trip.
            assert_eq!(NarInfo::parse(&info.to_string()).unwrap(), info);
        }
        let refs = reference_basenames(&p);
        let fp = fingerprint(
            p["store_path"].as_str().unwrap(),
            p["nar_hash_nix32"].as_str().unwrap(),
            p["nar_size"].as_u64().unwrap(),
            &refs,
            "/nix/store",
        );
        assert_eq!(fp, p["fingerprint"].as_str().unwrap());
        assert!(public.verify(&fp, p["sig"].as_str().unwrap()));
        assert!(!public.verify(&format!("{fp}x"), p["sig"].as_str().unwrap()));
    }
}

#[test]
fn every_narinfo_nix_wrote_round_trips() {
    let mut count = 0;
    for cache in ["nixcache-none", "nixcache-xz", "nixcache-zstd", "nixcache-ca"] {
        for entry in std::fs::read_dir(common::nix_wire().join(cache)).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "narinfo") {
                let text = std::fs::read_to_string(&path).unwrap();
                let parsed = NarInfo::parse(&text).unwrap_or_else(|| panic!("{} does not parse", path.display()));
                assert_eq!(parsed.to_string(), text, "{}", path.display());
                count += 1;
            }
        }
    }
    assert_eq!(count, 13);
}

#[test]
fn test_key_matches_its_public_half() {
    let v = common::vectors();
    let key = SecretKey::parse(v["test_key"]["secret_key_file"].as_str().unwrap()).unwrap();
    assert_eq!(key.public_key().to_string(), v["test_key"]["public_key"].as_str().unwrap());
    let file = std::fs::read_to_string(common::nix_wire().join("keys/test.pub")).unwrap();
    assert_eq!(PublicKey::parse(&file).unwrap(), key.public_key());
}
