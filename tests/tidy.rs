//! Code-base rules that are cheap to check: every source file opens with a `//!` doc saying what
//! it owns.

#![allow(clippy::unwrap_used)] // Test code: a panic is a failed test.

use std::path::Path;

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn every_module_starts_with_a_doc_comment() {
    let mut files = Vec::new();
    rust_files(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"), &mut files);
    assert!(files.len() > 20);
    let missing: Vec<_> = files
        .iter()
        .filter(|f| !std::fs::read_to_string(f).unwrap().starts_with("//!"))
        .map(|f| f.display().to_string())
        .collect();
    assert!(missing.is_empty(), "files without a leading //! doc: {missing:?}");
}

/// Workflow examples never splice `${{ … }}` expressions into a `run:` script (a dispatcher's
/// input would become shell code); they pass them through `env:`.
#[test]
fn workflow_examples_pass_expressions_through_the_environment() {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    for entry in std::fs::read_dir(examples).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "yaml" && e != "yml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let mut run_indent: Option<usize> = None;
        for (n, line) in text.lines().enumerate() {
            let indent = line.len() - line.trim_start().len();
            if let Some(i) = run_indent {
                if line.trim().is_empty() || indent > i {
                    assert!(!line.contains("${{"), "{}:{}: expression in a run script: {line}", path.display(), n + 1);
                    continue;
                }
                run_indent = None;
            }
            let item = line.trim_start().trim_start_matches("- ");
            if let Some(rest) = item.strip_prefix("run:") {
                assert!(!rest.contains("${{"), "{}:{}: expression in a run script", path.display(), n + 1);
                run_indent = Some(indent);
            }
        }
    }
}
