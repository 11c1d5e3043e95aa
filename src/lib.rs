//! hearth: a Nix binary cache and NixOS build worker in one process.
//!
//! Data flows one way: `config` → `store` (and `bucket`) → `http` or `builder` → `metrics`. `nix` holds the pure
//! formats every layer uses. See ARCHITECTURE.md.

pub mod app;
pub mod bucket;
pub mod builder;
pub mod cli;
pub mod config;
pub mod flake_update;
pub mod fleet;
pub mod fleet_view;
pub mod http;
pub mod mcp;
pub mod metrics;
pub mod nix;
pub mod regular_file;
pub mod store;
pub mod utc;
pub mod validate;
