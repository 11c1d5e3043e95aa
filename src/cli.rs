//! Command-line flags (clap derive). No I/O: `main` turns these into actions.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// hearth: a Nix binary cache and NixOS build worker in one process.
#[derive(Debug, Parser)]
#[command(version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the local Nix store as a binary cache (and run the builder, if configured).
    Serve {
        /// TOML configuration file; without one, the embedded defaults serve the local store.
        #[arg(long, env = "HEARTH_CONFIG")]
        config: Option<PathBuf>,
        /// Override `bind` from the file (`host:port` or `unix:/path`).
        #[arg(long)]
        bind: Option<String>,
    },
    /// Check a configuration file (and its key files) and exit.
    CheckConfig {
        #[arg(long, env = "HEARTH_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Generate a signing key pair in Nix's format.
    Keygen {
        /// Key name, e.g. `nix-cache02.home.2rjus.net-1`.
        name: String,
        /// Where to write the secret key (created with mode 0600; never overwritten).
        #[arg(long)]
        secret_key_file: PathBuf,
        /// Where to write the public key.
        #[arg(long)]
        public_key_file: PathBuf,
    },
    /// Make a NATS user NKey: its seed into a new file (mode 0600), its public key printed.
    Nkey {
        /// Where to write the seed (never overwritten).
        #[arg(long)]
        seed_file: PathBuf,
    },
    /// Ask the builder over NATS to build a repo's hosts, and follow the build.
    Build(crate::builder::cli::BuildArgs),
    /// Update flake.lock on a branch, build every host, and promote it only if all built.
    FlakeUpdate(crate::flake_update::FlakeUpdateArgs),
    /// Serve the Model Context Protocol on stdio, for AI assistants.
    Mcp(crate::mcp::McpArgs),
    /// The S3 bucket built systems are pushed to.
    #[command(subcommand)]
    Bucket(BucketCommand),
}

#[derive(Debug, Subcommand)]
pub enum BucketCommand {
    /// Delete what no kept generation of any host needs (narinfos first, then NARs).
    Gc(crate::bucket::cli::GcArgs),
    /// Push the closures of built store paths, as the builder pushes its own.
    Push(crate::bucket::cli::PushArgs),
}
