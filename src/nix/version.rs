//! What a `nix --version` line says, and which command forms that Nix takes.
//!
//! Pure: the caller runs `nix --version` once and asks this module what the Nix it found
//! supports, so that no call prints a deprecation warning into a reply or a log.

use std::fmt;

/// A Nix implementation and its version, from `nix --version`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NixVersion {
    /// Lix (`nix (Lix, like Nix) 2.91.1`) numbers its releases 2.90 and up, from Nix 2.18.
    pub lix: bool,
    pub major: u32,
    pub minor: u32,
    pub patch: u32,
}

impl NixVersion {
    /// Parses the first line of `nix --version`: `nix (Nix) 2.34.8`, `nix (Nix) 2.8.0`,
    /// `nix (Lix, like Nix) 2.91.1`, `nix (Nix) 2.19.0pre20231012_dirty`.
    pub fn parse(text: &str) -> Option<NixVersion> {
        let line = text.lines().next()?.trim();
        let (name, number) = line.rsplit_once(' ')?;
        let lix = name.contains("Lix");
        let mut parts = number.split('.').map(|p| {
            let digits: String = p.chars().take_while(char::is_ascii_digit).collect();
            digits.parse::<u32>().ok()
        });
        let major = parts.next()??;
        let minor = parts.next()??;
        let patch = parts.next().flatten().unwrap_or(0);
        Some(NixVersion { lix, major, minor, patch })
    }

    fn at_least(&self, major: u32, minor: u32) -> bool {
        (self.major, self.minor) >= (major, minor)
    }

    /// `nix flake update <input>…` (Nix 2.19, Lix 2.90); older Nix only has
    /// `nix flake lock --update-input <input>`, which Nix 2.19+ deprecates and Lix refuses.
    pub fn has_flake_update_inputs(&self) -> bool {
        self.lix || self.at_least(2, 19)
    }

    /// How a derivation's outputs are named as an installable: `<drv>^*` (Nix 2.13, Lix), or the
    /// bare `<drv>` that older Nix builds (and newer Nix reads differently, with a warning).
    pub fn drv_outputs(&self, drv: &str) -> String {
        if self.lix || self.at_least(2, 13) { format!("{drv}^*") } else { drv.to_owned() }
    }
}

impl fmt::Display for NixVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = if self.lix { "Lix" } else { "Nix" };
        write!(f, "{name} {}.{}.{}", self.major, self.minor, self.patch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_nix_and_lix_print() {
        let v = |s| NixVersion::parse(s).unwrap();
        assert_eq!(v("nix (Nix) 2.8.0\n"), NixVersion { lix: false, major: 2, minor: 8, patch: 0 });
        assert_eq!(v("nix (Nix) 2.34.8"), NixVersion { lix: false, major: 2, minor: 34, patch: 8 });
        assert!(v("nix (Lix, like Nix) 2.91.1").lix);
        assert_eq!(v("nix (Nix) 2.19.0pre20231012_dirty").minor, 19);
        assert_eq!(v("nix (Nix) 2.24").patch, 0);
        assert_eq!(v("nix (Nix) 2.34.8").to_string(), "Nix 2.34.8");
        for bad in ["", "nix", "nix (Nix) two", "nix (Nix) 2"] {
            assert_eq!(NixVersion::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn derivation_outputs_are_named_as_that_nix_reads_them() {
        let v = |s| NixVersion::parse(s).unwrap();
        assert_eq!(v("nix (Nix) 2.8.0").drv_outputs("/nix/store/a.drv"), "/nix/store/a.drv");
        assert_eq!(v("nix (Nix) 2.13.0").drv_outputs("/nix/store/a.drv"), "/nix/store/a.drv^*");
        assert_eq!(v("nix (Lix, like Nix) 2.91.1").drv_outputs("/nix/store/a.drv"), "/nix/store/a.drv^*");
    }

    #[test]
    fn flake_update_form_by_version() {
        let v = |s| NixVersion::parse(s).unwrap().has_flake_update_inputs();
        assert!(!v("nix (Nix) 2.8.0"));
        assert!(!v("nix (Nix) 2.18.9"));
        assert!(v("nix (Nix) 2.19.0"));
        assert!(v("nix (Nix) 2.34.8"));
        assert!(v("nix (Lix, like Nix) 2.90.0"));
    }
}
