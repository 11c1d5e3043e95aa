//! Each host's last good systems ("generations"), kept as GC roots so that the cache keeps
//! serving them (a rollback deploy substitutes from it) and so that each new system can be
//! compared with the one before.
//!
//! Layout under `gcroots_dir`: `<repo>/<host>` is the newest good toplevel (`nix build`'s
//! out-link, as before generations existed), and `<repo>/.generations/<host>/<n>-<unix time>-
//! <commit>` are the last `keep` of them, newest included, each an indirect GC root. The names
//! carry what is known of each generation, so the directory alone is the record: it is read back
//! at startup, and nothing else needs to survive a restart.
//!
//! Only the repo's deploy branch makes generations. A build of another branch is linked at
//! `<repo>/.branches/<branch>/<host>` and rooted only while recent ([`BRANCH_ROOT_DAYS`]); a
//! system built again takes no second slot.

use std::path::{Path, PathBuf};

pub use crate::fleet::Generation;

const DIR: &str = ".generations";
/// Out-links of builds of other branches than the deploy branch: `<repo>/.branches/<branch>/<host>`
/// (a `/` in the branch name is `%`, which no branch name holds).
const BRANCHES: &str = ".branches";
/// How long the newest build of another branch stays rooted.
pub const BRANCH_ROOT_DAYS: u64 = 7;

/// Parses `<n>-<unix time>-<commit or "unknown">`.
fn parse_name(name: &str) -> Option<(u64, i64, Option<String>)> {
    let mut parts = name.splitn(3, '-');
    let number = parts.next()?.parse().ok()?;
    let built_at = parts.next()?.parse().ok()?;
    let commit = parts.next()?;
    let commit = (commit != "unknown").then(|| commit.to_owned()).filter(|c| super::job::is_valid_rev(c));
    Some((number, built_at, commit))
}

fn name_of(g: &Generation) -> String {
    format!("{}-{}-{}", g.number, g.built_at, g.commit.as_deref().unwrap_or("unknown"))
}

/// The generations of every host: the record kept under one GC-root directory.
#[derive(Debug, Clone)]
pub struct Generations {
    root: PathBuf,
    keep: usize,
}

impl Generations {
    pub fn new(gcroots_dir: &Path, keep: usize) -> Self {
        Self { root: gcroots_dir.to_owned(), keep: keep.max(1) }
    }

    fn dir(&self, repo: &str, host: &str) -> PathBuf {
        self.root.join(repo).join(DIR).join(host)
    }

    /// Where `nix build` links a host's result: `<repo>/<host>` for the deploy branch (the
    /// newest good system), `<repo>/.branches/<branch>/<host>` for any other branch.
    pub fn out_link(&self, repo: &str, host: &str, other_branch: Option<&str>) -> PathBuf {
        match other_branch {
            None => self.root.join(repo).join(host),
            Some(b) => self.root.join(repo).join(BRANCHES).join(b.replace('/', "%")).join(host),
        }
    }

    /// Removes the out-links of other branches' builds older than `max_age` (and directories
    /// left empty): a branch build is rooted only while it is recent.
    pub fn prune_branch_roots(&self, repos: &[String], max_age: std::time::Duration) {
        for repo in repos {
            let Ok(branches) = std::fs::read_dir(self.root.join(repo).join(BRANCHES)) else { continue };
            for branch in branches.filter_map(Result::ok) {
                let Ok(links) = std::fs::read_dir(branch.path()) else { continue };
                for link in links.filter_map(Result::ok) {
                    let old = std::fs::symlink_metadata(link.path())
                        .and_then(|m| m.modified())
                        .is_ok_and(|t| t.elapsed().is_ok_and(|age| age > max_age));
                    if old && std::fs::remove_file(link.path()).is_ok() {
                        tracing::info!(root = %link.path().display(), "dropped the root of an old branch build");
                    }
                }
                let _ = std::fs::remove_dir(branch.path());
            }
        }
    }

    /// The host's newest good toplevel as the out-link says (also before any generation was
    /// recorded, e.g. just after an upgrade to a hearth with generations).
    pub fn newest_link(&self, repo: &str, host: &str) -> Option<String> {
        let target = std::fs::read_link(self.root.join(repo).join(host)).ok()?;
        Some(target.to_string_lossy().into_owned())
    }

    /// The host's generations, oldest first. Entries that are not ours are ignored.
    pub fn list(&self, repo: &str, host: &str) -> Vec<Generation> {
        let Ok(entries) = std::fs::read_dir(self.dir(repo, host)) else { return Vec::new() };
        let mut out: Vec<Generation> = entries
            .filter_map(Result::ok)
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                let (number, built_at, commit) = parse_name(&name)?;
                let path = std::fs::read_link(e.path()).ok()?.to_string_lossy().into_owned();
                Some(Generation { number, path, built_at, commit, builder: None })
            })
            .collect();
        out.sort_by_key(|g| g.number);
        out
    }

    /// Every (repo, host) with generations on disk, for startup.
    pub fn hosts(&self, repos: &[String]) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for repo in repos {
            let Ok(entries) = std::fs::read_dir(self.root.join(repo).join(DIR)) else { continue };
            for e in entries.filter_map(Result::ok) {
                let host = e.file_name().to_string_lossy().into_owned();
                if super::job::is_valid_name(&host) {
                    out.push((repo.clone(), host));
                }
            }
        }
        out.sort();
        out
    }

    /// Out-links (`<repo>/<host>`) that point at none of the host's recorded generations: a
    /// build that finished after hearth died and was never reported. Hosts without
    /// generations keep theirs (it is adopted as their first generation).
    pub fn unrecorded_links(&self, repos: &[String]) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for repo in repos {
            let Ok(entries) = std::fs::read_dir(self.root.join(repo)) else { continue };
            for e in entries.filter_map(Result::ok) {
                let host = e.file_name().to_string_lossy().into_owned();
                if host.starts_with('.') || !e.file_type().is_ok_and(|t| t.is_symlink()) {
                    continue;
                }
                let Ok(target) = std::fs::read_link(e.path()) else { continue };
                let gens = self.list(repo, &host);
                if !gens.is_empty() && !gens.iter().any(|g| Path::new(&g.path) == target) {
                    out.push(e.path());
                }
            }
        }
        out
    }

    /// The link a new generation gets, and the generations to drop once it is rooted: the plan
    /// for recording `path` as the host's newest. `None` if it already is the newest.
    pub fn plan(&self, repo: &str, host: &str, path: &str, commit: Option<&str>, now: i64) -> Option<Plan> {
        let existing = self.list(repo, host);
        if existing.last().is_some_and(|g| g.path == path) {
            return None;
        }
        let next = existing.last().map_or(1, |g| g.number + 1);
        let new = Generation {
            number: next,
            path: path.to_owned(),
            built_at: now,
            commit: commit.map(str::to_owned),
            builder: None,
        };
        // An older generation of the same system becomes the newest: no system holds two slots.
        let (same, others): (Vec<&Generation>, Vec<&Generation>) = existing.iter().partition(|g| g.path == path);
        let keep_old = self.keep - 1;
        let drop = others.len().saturating_sub(keep_old);
        let obsolete = same.iter().chain(&others[..drop]).map(|g| self.dir(repo, host).join(name_of(g))).collect();
        Some(Plan { link: self.dir(repo, host).join(name_of(&new)), generation: new, obsolete })
    }
}

/// What recording a generation does: root `generation` at `link`, then remove `obsolete`.
#[derive(Debug)]
pub struct Plan {
    pub link: PathBuf,
    pub generation: Generation,
    pub obsolete: Vec<PathBuf>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(g: &Generations, repo: &str, host: &str, path: &str, now: i64) {
        if let Some(plan) = g.plan(repo, host, path, Some(&"a".repeat(40)), now) {
            std::fs::create_dir_all(plan.link.parent().unwrap()).unwrap();
            std::os::unix::fs::symlink(path, &plan.link).unwrap();
            for o in plan.obsolete {
                std::fs::remove_file(o).unwrap();
            }
        }
    }

    #[test]
    fn keeps_the_last_n_and_reads_them_back() {
        let dir = tempfile::tempdir().unwrap();
        let g = Generations::new(dir.path(), 3);
        for (i, p) in ["/nix/store/a-1", "/nix/store/b-2", "/nix/store/b-2", "/nix/store/c-3", "/nix/store/d-4"]
            .iter()
            .enumerate()
        {
            link(&g, "fleet", "web-01.home", p, 1000 + i as i64);
        }
        let list = g.list("fleet", "web-01.home");
        let paths: Vec<&str> = list.iter().map(|x| x.path.as_str()).collect();
        assert_eq!(paths, ["/nix/store/b-2", "/nix/store/c-3", "/nix/store/d-4"]);
        assert_eq!(list.iter().map(|x| x.number).collect::<Vec<_>>(), [2, 3, 4]);
        assert_eq!(list[2].commit.as_deref(), Some("a".repeat(40).as_str()));
        assert_eq!(g.hosts(&["fleet".into(), "other".into()]), [("fleet".to_owned(), "web-01.home".to_owned())]);

        let one = Generations::new(dir.path(), 1);
        link(&one, "fleet", "web-01.home", "/nix/store/e-5", 2000);
        assert_eq!(one.list("fleet", "web-01.home").len(), 1);
    }

    #[test]
    fn a_system_built_again_holds_one_slot_and_is_the_newest() {
        let dir = tempfile::tempdir().unwrap();
        let g = Generations::new(dir.path(), 3);
        for (i, p) in ["/nix/store/a-1", "/nix/store/b-2", "/nix/store/c-3", "/nix/store/b-2"].iter().enumerate() {
            link(&g, "fleet", "h", p, 1000 + i as i64);
        }
        let paths: Vec<String> = g.list("fleet", "h").into_iter().map(|x| x.path).collect();
        assert_eq!(paths, ["/nix/store/a-1", "/nix/store/c-3", "/nix/store/b-2"]);
    }

    #[test]
    fn branch_builds_link_apart_from_the_deploy_branch() {
        let g = Generations::new(Path::new("/r"), 3);
        assert_eq!(g.out_link("fleet", "h", None), Path::new("/r/fleet/h"));
        assert_eq!(g.out_link("fleet", "h", Some("flake-update/x")), Path::new("/r/fleet/.branches/flake-update%x/h"));
    }

    #[test]
    fn names_parse_and_foreign_entries_are_ignored() {
        assert_eq!(parse_name("3-1700000000-unknown"), Some((3, 1_700_000_000, None)));
        assert_eq!(parse_name("junk"), None);
        assert_eq!(parse_name("1-2-notacommit"), Some((1, 2, None)));
    }
}
