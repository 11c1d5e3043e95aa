//! What changed between two closures, package by package, the way `nix store diff-closures`
//! groups them: store path names split into a package name and a version (Nix's `DrvName`, after
//! stripping an output suffix such as `-bin` or `-lib`), several versions of one name as a set.
//!
//! Pure: it takes (basename, NAR size) pairs, however the caller found them.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

/// Entries listed at most per kind of change; the rest are counted in `truncated`.
pub const MAX_LISTED: usize = 50;

/// A package whose set of versions changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionChange {
    pub name: String,
    /// Versions only in the old closure (`""` for a path without a version).
    pub old: Vec<String>,
    /// Versions only in the new closure.
    pub new: Vec<String>,
    /// NAR bytes of the package's paths, new minus old.
    pub size_delta: i64,
}

/// A package present on one side only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Package {
    pub name: String,
    pub versions: Vec<String>,
    /// NAR bytes of its paths.
    pub size: u64,
}

/// The changes from one closure to another.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Changes {
    /// There is no earlier good system of this host to compare with: nothing is listed.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub first_build: bool,
    pub paths_before: usize,
    pub paths_after: usize,
    pub bytes_before: u64,
    pub bytes_after: u64,
    /// Packages in both closures with another set of versions (upgrades and downgrades).
    pub changed: Vec<VersionChange>,
    pub added: Vec<Package>,
    pub removed: Vec<Package>,
    /// Paths whose name and version are unchanged but whose hash changed (rebuilds).
    pub rebuilt: usize,
    /// Entries left out of `changed`, `added` and `removed` beyond [`MAX_LISTED`] each.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub truncated: usize,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.changed.is_empty() && self.added.is_empty() && self.removed.is_empty() && self.rebuilt == 0
    }

    /// Closure bytes, new minus old.
    pub fn bytes_delta(&self) -> i64 {
        self.bytes_after as i64 - self.bytes_before as i64
    }
}

/// Bytes for people: `512 B`, `12.4 MiB`; with `signed`, a `+` before growth.
pub fn human_bytes(n: i64, signed: bool) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n.unsigned_abs() as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < units.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    let sign = if n < 0 {
        "-"
    } else if signed {
        "+"
    } else {
        ""
    };
    if unit == 0 { format!("{sign}{v:.0} B") } else { format!("{sign}{v:.1} {}", units[unit]) }
}

/// Versions as `diff-closures` prints them: `ε` for none.
pub fn show_versions(v: &[String]) -> String {
    v.iter().map(|s| if s.is_empty() { "ε" } else { s.as_str() }).collect::<Vec<_>>().join(", ")
}

impl Changes {
    /// One line: `3 changed, 1 added, 1 removed, 2 rebuilt, +12.4 MiB (120 → 125 paths)`.
    pub fn headline(&self) -> String {
        if self.first_build {
            return format!(
                "first recorded build: {} in {} paths, nothing to compare with",
                human_bytes(self.bytes_after as i64, false),
                self.paths_after
            );
        }
        if self.is_empty() && self.bytes_delta() == 0 {
            return "no change".to_owned();
        }
        format!(
            "{} changed, {} added, {} removed, {} rebuilt, {} ({} → {} paths)",
            self.changed.len(),
            self.added.len(),
            self.removed.len(),
            self.rebuilt,
            human_bytes(self.bytes_delta(), true),
            self.paths_before,
            self.paths_after
        )
    }

    /// One line per listed package: `openssl: 3.0.13 → 3.0.14, +1.0 KiB`, `+ newtool 2.1`,
    /// `- oldtool 1.0`.
    pub fn lines(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .changed
            .iter()
            .map(|v| {
                format!(
                    "{}: {} → {}, {}",
                    v.name,
                    show_versions(&v.old),
                    show_versions(&v.new),
                    human_bytes(v.size_delta, true)
                )
            })
            .collect();
        out.extend(self.added.iter().map(|p| format!("+ {} {}", p.name, show_versions(&p.versions))));
        out.extend(self.removed.iter().map(|p| format!("- {} {}", p.name, show_versions(&p.versions))));
        if self.truncated > 0 {
            out.push(format!("… and {} more", self.truncated));
        }
        out
    }
}

/// Nix's `DrvName`: the name ends at the first `-` followed by a character that is not a
/// letter; the rest is the version (`""` if there is none).
pub fn parse_drv_name(name: &str) -> (&str, &str) {
    let bytes = name.as_bytes();
    for i in 0..bytes.len() {
        if bytes[i] == b'-' && bytes.get(i + 1).is_some_and(|c| !c.is_ascii_alphabetic()) {
            return (&name[..i], &name[i + 1..]);
        }
    }
    (name, "")
}

/// Strips an output suffix as `diff-closures` does: the last `-<lowercase letters>`, or
/// `-lib32`/`-lib64`, when it ends the name.
pub fn strip_output(name: &str) -> &str {
    let Some(dash) = name.rfind('-') else { return name };
    let suffix = &name[dash + 1..];
    let is_output = (!suffix.is_empty() && suffix.bytes().all(|c| c.is_ascii_lowercase()))
        || suffix == "lib32"
        || suffix == "lib64";
    if is_output { &name[..dash] } else { name }
}

/// The package name and version of a store path basename (`<hash>-<name>`).
fn package_of(basename: &str) -> (String, String) {
    let name = basename.split_once('-').map_or(basename, |(_, n)| n);
    let (pkg, version) = parse_drv_name(strip_output(name));
    (pkg.to_owned(), version.to_owned())
}

/// name → version → (basenames, NAR bytes)
type Grouped = BTreeMap<String, BTreeMap<String, (BTreeSet<String>, u64)>>;

fn group(closure: &[(String, u64)]) -> Grouped {
    let mut g = Grouped::new();
    for (basename, size) in closure {
        let (name, version) = package_of(basename);
        let entry = g.entry(name).or_default().entry(version).or_default();
        entry.0.insert(basename.clone());
        entry.1 += size;
    }
    g
}

/// The changes from `before` to `after`, each a closure as (store path basename, NAR size).
pub fn diff(before: &[(String, u64)], after: &[(String, u64)]) -> Changes {
    let (old, new) = (group(before), group(after));
    let mut c = Changes {
        paths_before: before.len(),
        paths_after: after.len(),
        bytes_before: before.iter().map(|(_, s)| s).sum(),
        bytes_after: after.iter().map(|(_, s)| s).sum(),
        ..Changes::default()
    };
    let empty = BTreeMap::new();
    let names: BTreeSet<&String> = old.keys().chain(new.keys()).collect();
    for name in names {
        let (o, n) = (old.get(name).unwrap_or(&empty), new.get(name).unwrap_or(&empty));
        let size = |m: &BTreeMap<String, (BTreeSet<String>, u64)>| m.values().map(|(_, s)| *s).sum::<u64>();
        let removed: Vec<String> = o.keys().filter(|v| !n.contains_key(*v)).cloned().collect();
        let added: Vec<String> = n.keys().filter(|v| !o.contains_key(*v)).cloned().collect();
        // Same name and version on both sides, other paths: rebuilt.
        for (version, (paths, _)) in o {
            if let Some((new_paths, _)) = n.get(version) {
                c.rebuilt += new_paths.difference(paths).count();
            }
        }
        if o.is_empty() {
            c.added.push(Package { name: name.clone(), versions: added, size: size(n) });
        } else if n.is_empty() {
            c.removed.push(Package { name: name.clone(), versions: removed, size: size(o) });
        } else if !removed.is_empty() || !added.is_empty() {
            let size_delta = size(n) as i64 - size(o) as i64;
            c.changed.push(VersionChange { name: name.clone(), old: removed, new: added, size_delta });
        }
    }
    for list_len in [c.changed.len(), c.added.len(), c.removed.len()] {
        c.truncated += list_len.saturating_sub(MAX_LISTED);
    }
    c.changed.truncate(MAX_LISTED);
    c.added.truncate(MAX_LISTED);
    c.removed.truncate(MAX_LISTED);
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_split_as_nix_splits_them() {
        assert_eq!(parse_drv_name("linux-6.6.1"), ("linux", "6.6.1"));
        assert_eq!(parse_drv_name("nixos-system-web1-24.05"), ("nixos-system-web1", "24.05"));
        assert_eq!(parse_drv_name("etc"), ("etc", ""));
        assert_eq!(parse_drv_name("foo-_bar"), ("foo", "_bar"));
        assert_eq!(strip_output("openssl-3.0.13-bin"), "openssl-3.0.13");
        assert_eq!(strip_output("glibc-2.39-lib64"), "glibc-2.39");
        assert_eq!(strip_output("linux-6.6.1"), "linux-6.6.1");
        assert_eq!(strip_output("unit-script-foo"), "unit-script");
        assert_eq!(
            package_of("0000000000000000000000000000000a-openssl-3.0.13-bin"),
            ("openssl".into(), "3.0.13".into())
        );
    }

    fn p(name: &str, size: u64) -> (String, u64) {
        (name.to_owned(), size)
    }

    #[test]
    fn upgrades_additions_removals_and_rebuilds() {
        let before = [
            p("aaaa-linux-6.6.1", 100),
            p("bbbb-openssl-3.0.13", 10),
            p("cccc-openssl-3.0.13-bin", 5),
            p("dddd-oldtool-1.0", 7),
            p("eeee-bash-5.2", 3),
            p("ffff-etc", 1),
        ];
        let after = [
            p("aaab-linux-6.6.2", 120),
            p("bbbc-openssl-3.0.14", 11),
            p("cccd-openssl-3.0.14-bin", 5),
            p("gggg-newtool-2.1", 9),
            p("eeef-bash-5.2", 3),
            p("fffg-etc", 1),
        ];
        let c = diff(&before, &after);
        assert_eq!((c.paths_before, c.paths_after), (6, 6));
        assert_eq!((c.bytes_before, c.bytes_after), (126, 149));
        let names: Vec<&str> = c.changed.iter().map(|v| v.name.as_str()).collect();
        assert_eq!(names, ["linux", "openssl"]);
        assert_eq!(c.changed[0].old, ["6.6.1"]);
        assert_eq!(c.changed[0].new, ["6.6.2"]);
        assert_eq!(c.changed[0].size_delta, 20);
        assert_eq!(c.added[0].name, "newtool");
        assert_eq!(c.removed[0].name, "oldtool");
        // bash and etc: same versions, new hashes.
        assert_eq!(c.rebuilt, 2);
        assert_eq!(c.truncated, 0);
        assert_eq!(c.headline(), "2 changed, 1 added, 1 removed, 2 rebuilt, +23 B (6 → 6 paths)");
        assert_eq!(c.lines()[0], "linux: 6.6.1 → 6.6.2, +20 B");
        assert_eq!(c.lines()[2], "+ newtool 2.1");
        assert_eq!(c.lines()[3], "- oldtool 1.0");
        assert_eq!(human_bytes(12 * 1024 * 1024 + 400 * 1024, true), "+12.4 MiB");
        assert_eq!(human_bytes(512, false), "512 B");
        assert_eq!(human_bytes(-2048, true), "-2.0 KiB");
    }

    #[test]
    fn long_lists_are_cut_and_counted() {
        let after: Vec<_> = (0..60).map(|i| p(&format!("{i:04}-pkg{i}-1.0"), 1)).collect();
        let c = diff(&[], &after);
        assert_eq!(c.added.len(), MAX_LISTED);
        assert_eq!(c.truncated, 10);
    }
}
