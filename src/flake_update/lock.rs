//! `flake.lock` comparison: which inputs moved, from which revision to which.
//!
//! Pure: parses two lock files' JSON and lists the root's direct inputs whose locked revision (or
//! NAR hash, for inputs without one) changed.

use std::collections::BTreeMap;

use serde_json::Value;

/// One input that moved.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct InputChange {
    pub name: String,
    /// Short revision (or NAR hash) before; `None` for a new input.
    pub old: Option<String>,
    /// After; `None` for a removed input.
    pub new: Option<String>,
}

/// The locked identity of each direct input of the root node: `rev` if it has one, else
/// `narHash`.
/// The names of the root's direct inputs (followed ones included).
pub fn input_names(lock: &Value) -> Vec<String> {
    let root = lock["root"].as_str().unwrap_or("root");
    lock["nodes"][root]["inputs"].as_object().map(|o| o.keys().cloned().collect()).unwrap_or_default()
}

fn inputs(lock: &Value) -> BTreeMap<String, String> {
    let nodes = &lock["nodes"];
    let root = lock["root"].as_str().unwrap_or("root");
    let mut out = BTreeMap::new();
    let Some(root_inputs) = nodes[root]["inputs"].as_object() else { return out };
    for (name, target) in root_inputs {
        // An input is a node name, or a path of names when it follows another input.
        let Some(node) = target.as_str() else { continue };
        let locked = &nodes[node]["locked"];
        if let Some(id) = locked["rev"].as_str().or_else(|| locked["narHash"].as_str()) {
            out.insert(name.clone(), id.to_owned());
        }
    }
    out
}

fn short(id: &str) -> String {
    if id.len() == 40 && id.bytes().all(|c| c.is_ascii_hexdigit()) { id[..12].to_owned() } else { id.to_owned() }
}

/// The inputs that differ between two lock files (either may be absent: `Value::Null`).
pub fn diff(old: &Value, new: &Value) -> Vec<InputChange> {
    let (a, b) = (inputs(old), inputs(new));
    let mut names: Vec<&String> = a.keys().chain(b.keys()).collect();
    names.sort();
    names.dedup();
    names
        .into_iter()
        .filter(|n| a.get(*n) != b.get(*n))
        .map(|n| InputChange { name: n.clone(), old: a.get(n).map(|s| short(s)), new: b.get(n).map(|s| short(s)) })
        .collect()
}

/// The commit message for a lock update.
/// The subject line of every lock update commit.
pub const COMMIT_SUBJECT: &str = "flake.lock: update";

pub fn commit_message(changes: &[InputChange]) -> String {
    let mut msg = format!("{COMMIT_SUBJECT}\n\n");
    for c in changes {
        let old = c.old.as_deref().unwrap_or("(new)");
        let new = c.new.as_deref().unwrap_or("(removed)");
        msg.push_str(&format!("- {}: {old} -> {new}\n", c.name));
    }
    msg
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lock(nixpkgs: &str, dep: Option<&str>) -> Value {
        let mut nodes = serde_json::json!({
            "nixpkgs": {"locked": {"rev": nixpkgs, "type": "github"}},
            "root": {"inputs": {"nixpkgs": "nixpkgs"}},
        });
        if let Some(d) = dep {
            nodes["dep"] = serde_json::json!({"locked": {"narHash": d}});
            nodes["root"]["inputs"]["dep"] = "dep".into();
            nodes["root"]["inputs"]["follows"] = serde_json::json!(["nixpkgs"]);
        }
        serde_json::json!({"nodes": nodes, "root": "root", "version": 7})
    }

    #[test]
    fn lists_moved_new_and_removed_inputs() {
        let a = "a".repeat(40);
        let b = "b".repeat(40);
        assert_eq!(diff(&lock(&a, None), &lock(&a, None)), vec![]);
        let changes = diff(&lock(&a, Some("sha256-x")), &lock(&b, None));
        assert_eq!(
            changes,
            vec![
                InputChange { name: "dep".into(), old: Some("sha256-x".into()), new: None },
                InputChange {
                    name: "nixpkgs".into(),
                    old: Some("aaaaaaaaaaaa".into()),
                    new: Some("bbbbbbbbbbbb".into())
                },
            ]
        );
        let msg = commit_message(&changes);
        assert!(msg.starts_with("flake.lock: update\n\n"));
        assert!(msg.contains("- nixpkgs: aaaaaaaaaaaa -> bbbbbbbbbbbb\n"));
        assert!(msg.contains("- dep: sha256-x -> (removed)\n"));
        assert_eq!(diff(&Value::Null, &lock(&a, None))[0].old, None);
    }
}
