//! Test flakes: local git repos whose `nixosConfigurations.<host>.config.system.build.toplevel`
//! are plain derivations with builder `/bin/sh` (no nixpkgs).

use std::path::Path;
use std::process::Command;

use super::run_ok;

pub fn system() -> String {
    let arch = run_ok(Command::new("uname").arg("-m")).trim().to_owned();
    format!("{arch}-linux")
}

pub fn flake(hosts: &[(&str, String)]) -> String {
    let hosts: String =
        hosts.iter().map(|(name, script)| format!("        \"{name}\" = mk \"{name}\" \"{script}\";\n")).collect();
    format!(
        r#"{{
  outputs = {{ self }}:
    let
      mk = name: script: {{
        config.system.build.toplevel = derivation {{
          inherit name;
          system = "{}";
          builder = "/bin/sh";
          args = [ "-c" script ];
        }};
      }};
    in {{
      nixosConfigurations = {{
{hosts}      }};
    }};
}}
"#,
        system()
    )
}

pub fn git(dir: &Path, args: &[&str]) {
    run_ok(Command::new("git").arg("-C").arg(dir).args(args));
}

pub fn make_repo(path: &Path, flake_text: &str) {
    std::fs::create_dir_all(path).unwrap();
    git(path, &["init", "-q", "-b", "master"]);
    std::fs::write(path.join("flake.nix"), flake_text).unwrap();
    git(path, &["add", "flake.nix"]);
    git(path, &["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "init"]);
}

/// A random salt, so that each test's derivations are new to the store.
pub fn salt() -> String {
    let mut b = [0u8; 8];
    getrandom::fill(&mut b).unwrap();
    hex::encode(b)
}
