//! The record of one builder without a shared record: one JSON file under the state
//! directory, written whole and atomically on every change; a missing or corrupt file reads as
//! an empty record.

use serde::{Deserialize, Serialize};

use super::{HostRecord, Hosts};

#[derive(Serialize, Deserialize)]
pub(super) struct Saved {
    version: u32,
    hosts: Vec<SavedHost>,
}

#[derive(Serialize, Deserialize)]
pub(super) struct SavedHost {
    pub(super) repo: String,
    pub(super) host: String,
    #[serde(flatten)]
    pub(super) record: HostRecord,
}

pub(super) fn to_json(hosts: &Hosts) -> serde_json::Result<Vec<u8>> {
    let saved = Saved {
        // 2: hosts may carry `branches`; a version 1 record reads as one without them.
        version: 2,
        hosts: hosts
            .iter()
            .map(|((repo, host), record)| SavedHost { repo: repo.clone(), host: host.clone(), record: record.clone() })
            .collect(),
    };
    serde_json::to_vec_pretty(&saved)
}

pub(super) fn read(file: &std::path::Path) -> Hosts {
    let text = match crate::regular_file::read_to_string(file, 64 << 20) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Hosts::new(),
        Err(e) => {
            tracing::warn!(file = %file.display(), err = %e, "cannot read the fleet record; starting a new one");
            return Hosts::new();
        }
    };
    match serde_json::from_str::<Saved>(&text) {
        Ok(saved) => saved.hosts.into_iter().map(|h| ((h.repo, h.host), h.record)).collect(),
        Err(e) => {
            tracing::warn!(file = %file.display(), err = %e, "the fleet record is corrupt; starting a new one");
            Hosts::new()
        }
    }
}

pub(super) fn write_atomically(file: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = file.parent().unwrap_or(std::path::Path::new("."));
    std::fs::create_dir_all(dir)?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    std::io::Write::write_all(&mut tmp, bytes)?;
    tmp.persist(file).map_err(|e| e.error)?;
    Ok(())
}
