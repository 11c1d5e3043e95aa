//! A real Garage cluster for tests (three nodes from `scripts/garage`, on free loopback ports),
//! its bucket, key and website endpoint, stopped when dropped.
#![allow(dead_code)] // Not every test crate uses every helper.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use sha2::Digest;

/// A running Garage cluster, stopped when dropped.
pub struct Garage {
    pub dir: tempfile::TempDir,
    env: BTreeMap<String, String>,
}

impl Garage {
    pub fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/garage");
        let out = Command::new("bash").arg(&script).arg("start").arg(dir.path()).output().unwrap();
        assert!(
            out.status.success(),
            "scripts/garage start failed (scripts/test installs Garage):\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let env = std::fs::read_to_string(dir.path().join("env"))
            .unwrap()
            .lines()
            .filter_map(|l| l.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned())))
            .collect();
        Garage { dir, env }
    }

    /// Garage's own CLI against node 1, as an operator runs it: its output; it succeeded.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = Command::new(self.get("GARAGE_BIN"))
            .arg("-c")
            .arg(self.dir.path().join("node1/garage.toml"))
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "garage {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn get(&self, key: &str) -> &str {
        &self.env[key]
    }

    /// Writes an object through the S3 API, signed as a plain S3 client signs it.
    pub fn put(&self, key: &str, bytes: &[u8]) {
        let file = self.dir.path().join("upload");
        std::fs::write(&file, bytes).unwrap();
        let sum: String = sha2::Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect();
        let user = format!(
            "{}:{}",
            std::fs::read_to_string(self.get("GARAGE_ACCESS_KEY_ID_FILE")).unwrap().trim(),
            std::fs::read_to_string(self.get("GARAGE_SECRET_ACCESS_KEY_FILE")).unwrap().trim()
        );
        let out = Command::new("curl")
            .args(["-sf", "--aws-sigv4", &format!("aws:amz:{}:s3", self.get("GARAGE_REGION")), "--user", &user])
            .args(["-H", &format!("x-amz-content-sha256: {sum}"), "-T"])
            .arg(&file)
            .arg(format!("{}/{}/{key}", self.get("GARAGE_S3"), self.get("GARAGE_BUCKET")))
            .output()
            .unwrap();
        assert!(out.status.success(), "PUT {key}: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// A signed S3 request (`method` on `<bucket>/<path_and_query>`) as a plain S3 client sends
    /// it: its body.
    pub fn s3(&self, method: &str, path_and_query: &str) -> String {
        let user = format!(
            "{}:{}",
            std::fs::read_to_string(self.get("GARAGE_ACCESS_KEY_ID_FILE")).unwrap().trim(),
            std::fs::read_to_string(self.get("GARAGE_SECRET_ACCESS_KEY_FILE")).unwrap().trim()
        );
        let out = Command::new("curl")
            .args([
                "-sf",
                "-X",
                method,
                "--aws-sigv4",
                &format!("aws:amz:{}:s3", self.get("GARAGE_REGION")),
                "--user",
                &user,
            ])
            // The hash of the empty body every such request has.
            .args(["-H", "x-amz-content-sha256: e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"])
            .arg(format!(
                "{}/{}{}{path_and_query}",
                self.get("GARAGE_S3"),
                self.get("GARAGE_BUCKET"),
                if path_and_query.starts_with('?') { "" } else { "/" }
            ))
            .output()
            .unwrap();
        assert!(out.status.success(), "{method} {path_and_query}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// An object through the bucket's website endpoint (anonymous, as a Nix client reads it).
    pub fn web(&self, key: &str) -> Option<Vec<u8>> {
        let out = Command::new("curl").args(["-sf", &format!("{}/{key}", self.get("GARAGE_WEB"))]).output().unwrap();
        out.status.success().then_some(out.stdout)
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/garage");
        let _ = Command::new("bash").arg(script).arg("stop").arg(self.dir.path()).status();
    }
}
