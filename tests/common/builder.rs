//! The one builder fixture of the integration tests: a `[builder]` configuration over a test
//! NATS ([`BuilderToml`]), started and waited for until the builder takes requests
//! (`hearth_builder_ready`), never for a log line.

use std::path::Path;

use super::Hearth;
use super::nats::Nats;

/// A builder's configuration: top-level lines, the `[builder]` connection to the test NATS and
/// its GC roots, lines of its own, sections after it, and its repos.
pub struct BuilderToml {
    top: String,
    builder: String,
    sections: String,
    repos: String,
}

impl BuilderToml {
    /// A builder on `nats`, as the test's builder user, its GC roots in `roots`.
    pub fn new(nats: &Nats, roots: &Path) -> Self {
        let builder = format!(
            "nats_url = \"{}\"\nnkey_seed_file = \"{}\"\ngcroots_dir = \"{}\"\n",
            nats.url(),
            nats.builder_seed.display(),
            roots.display()
        );
        Self { top: String::new(), builder, sections: String::new(), repos: String::new() }
    }

    /// Top-level lines, and sections that come before `[builder]` (`state_dir`, `[bucket]`).
    pub fn top(mut self, lines: &str) -> Self {
        self.top.push_str(lines);
        self.top.push('\n');
        self
    }

    /// Lines of `[builder]` itself.
    pub fn with(mut self, lines: &str) -> Self {
        self.builder.push_str(lines);
        self.builder.push('\n');
        self
    }

    /// A section after `[builder]`, such as `[builder.jetstream]`.
    pub fn section(mut self, text: &str) -> Self {
        self.sections.push_str(text);
        self.sections.push('\n');
        self
    }

    /// A repo `name` at the flake `url`, deployed from its default branch.
    pub fn repo(self, name: &str, url: &str) -> Self {
        self.repo_lines(name, url, "")
    }

    /// A repo `name` at the flake `url`, deployed from `branch`.
    pub fn repo_on(self, name: &str, url: &str, branch: &str) -> Self {
        self.repo_lines(name, url, &format!("branch = \"{branch}\"\n"))
    }

    fn repo_lines(mut self, name: &str, url: &str, more: &str) -> Self {
        self.repos.push_str(&format!("\n[[builder.repos]]\nname = \"{name}\"\nurl = \"{url}\"\n{more}"));
        self
    }

    /// The configuration as TOML.
    pub fn render(&self) -> String {
        format!("{}\n[builder]\n{}\n{}{}", self.top, self.builder, self.sections, self.repos)
    }

    /// Starts hearth with it and waits until the builder takes requests.
    pub fn start(&self) -> Hearth {
        start(&self.render())
    }
}

/// Starts hearth with a builder configuration and waits until the builder takes requests.
pub fn start(config: &str) -> Hearth {
    start_env(config, &[])
}

/// As [`start`], with extra environment variables for hearth.
pub fn start_env(config: &str, env: &[(&str, &str)]) -> Hearth {
    let h = Hearth::start_env(config, env);
    h.wait_builder_ready();
    h
}
