//! The fleet-wide claim of a build, where several builders share a JetStream queue: the first
//! builder to plan a build (repo, target, branch and the commit it resolved to) claims it in
//! the shared record; a builder that takes an identical request while the claim's builder lives
//! adds its request's reply subjects to the claim and is done with it; the claim's builder sends
//! them every reply from then on, the final one included. A claim whose builder stopped is
//! taken over, joiners and all, by the builder its request is delivered to next.
//!
//! Architecture invariant: a claim changes only by compare-and-set on its key's revision, so a
//! joiner is either in the claim its builder reads before it releases the claim (and hears the
//! final reply), or finds no claim and builds (or answers from the record) itself.

use serde::{Deserialize, Serialize};

use async_nats::jetstream::kv;

use crate::fleet::{Presence, presence_key};

/// The shared record's key of a claim: `_claim/<hash of repo, target, branch, commit>`.
fn key(repo: &str, target: &str, branch: &str, commit: &str) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(format!("{repo}\0{target}\0{branch}\0{commit}").as_bytes());
    format!("_claim/{}", hex::encode(&digest[..16]))
}

/// A claim as the shared record holds it.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Claim {
    builder: String,
    /// When it was claimed (unix seconds).
    at: i64,
    /// Reply subjects of the requests that joined it.
    #[serde(default)]
    joiners: Vec<String>,
}

/// What became of a claim.
pub enum Claimed {
    /// This builder builds it.
    Mine(Held),
    /// Another builder, alive, builds it: its replies go to the request's subjects.
    Joined { builder: String },
}

/// A claim this builder holds, as last read.
pub struct Held {
    key: String,
    revision: u64,
    /// Joiners already told (they follow the running build).
    told: usize,
    /// The joiners of a claim taken over from a builder that stopped.
    pub inherited: Vec<String>,
}

/// Claims of builds in the shared record, as `me`.
#[derive(Clone)]
pub struct Claims {
    pub kv: kv::Store,
    pub me: String,
}

/// Attempts at a claim before the builder builds without one (the record being away never
/// stops a build).
const ATTEMPTS: usize = 20;

impl Claims {
    /// Claims the build, or joins the claim of a builder that builds it now (`building`, asked
    /// of its presence as the record holds it after the claim was read), adding `reply_to`.
    /// `taking_over`: the request was delivered before (its builder stopped), so a claim of
    /// another builder is taken over rather than joined. `None`: the record did not answer.
    pub async fn claim(
        &self,
        (repo, target, branch, commit): (&str, &str, &str, &str),
        reply_to: &[String],
        taking_over: bool,
        building: impl Fn(&Presence) -> bool,
    ) -> Option<Claimed> {
        let key = key(repo, target, branch, commit);
        for _ in 0..ATTEMPTS {
            let entry = match self.kv.entry(key.clone()).await {
                Ok(e) => e.filter(|e| e.operation == kv::Operation::Put),
                Err(e) => {
                    tracing::warn!(%key, err = %e, "cannot read a build's claim; building without one");
                    return None;
                }
            };
            let Some(entry) = entry else {
                let mine = Claim { builder: self.me.clone(), at: super::record::now_seconds(), joiners: Vec::new() };
                match self.kv.create(&key, to_bytes(&mine)).await {
                    Ok(revision) => return Some(Claimed::Mine(Held { key, revision, told: 0, inherited: Vec::new() })),
                    Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => continue,
                    Err(e) => {
                        tracing::warn!(%key, err = %e, "cannot claim a build; building without a claim");
                        return None;
                    }
                }
            };
            let mut claim = serde_json::from_slice::<Claim>(&entry.value).unwrap_or_else(|e| {
                tracing::warn!(%key, err = %e, "a build's claim is not one; taking it");
                Claim { builder: String::new(), at: 0, joiners: Vec::new() }
            });
            let joining = claim.builder != self.me && !taking_over && self.builds(&claim.builder, &building).await;
            let builder = claim.builder.clone();
            if joining {
                let new: Vec<String> = reply_to.iter().filter(|t| !claim.joiners.contains(t)).cloned().collect();
                claim.joiners.extend(new);
            } else {
                claim.builder = self.me.clone();
                claim.at = super::record::now_seconds();
            }
            match self.kv.update(&key, to_bytes(&claim), entry.revision).await {
                Ok(_) if joining => return Some(Claimed::Joined { builder }),
                Ok(revision) => {
                    if !builder.is_empty() && builder != self.me {
                        tracing::info!(%builder, "took over the claim of a build whose builder stopped");
                    }
                    let inherited = claim.joiners.clone();
                    return Some(Claimed::Mine(Held { key, revision, told: inherited.len(), inherited }));
                }
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => continue,
                Err(e) => {
                    tracing::warn!(%key, err = %e, "cannot claim a build; building without a claim");
                    return None;
                }
            }
        }
        tracing::warn!(%key, "a build's claim kept changing; building without one");
        None
    }

    /// Whether `builder`'s presence, read now (not from a watch that may lag the claim), says
    /// `building`. A claimant writes its presence before its claim, so this read sees it.
    async fn builds(&self, builder: &str, building: &impl Fn(&Presence) -> bool) -> bool {
        match self.kv.entry(presence_key(builder)).await {
            Ok(Some(e)) if e.operation == kv::Operation::Put => {
                serde_json::from_slice::<Presence>(&e.value).is_ok_and(|p| building(&p))
            }
            Ok(_) => false,
            Err(e) => {
                tracing::debug!(%builder, err = %e, "cannot read a claimant's presence; taking its claim over");
                false
            }
        }
    }

    /// Joiners added to `held` since it was last read.
    pub async fn new_joiners(&self, held: &mut Held) -> Vec<String> {
        let Ok(Some(entry)) = self.kv.entry(held.key.clone()).await else { return Vec::new() };
        if entry.operation != kv::Operation::Put || entry.revision == held.revision {
            return Vec::new();
        }
        let Ok(claim) = serde_json::from_slice::<Claim>(&entry.value) else { return Vec::new() };
        held.revision = entry.revision;
        let new = claim.joiners.get(held.told..).unwrap_or_default().to_vec();
        held.told = claim.joiners.len();
        new
    }

    /// Releases `held` once its build ended; returns joiners that came since it was last read
    /// (they get the final reply too). A joiner after the release finds no claim.
    pub async fn release(&self, mut held: Held) -> Vec<String> {
        let mut late = Vec::new();
        for _ in 0..ATTEMPTS {
            match self.kv.delete_expect_revision(&held.key, Some(held.revision)).await {
                Ok(()) => return late,
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                    late.extend(self.new_joiners(&mut held).await);
                }
                Err(e) => {
                    tracing::warn!(key = %held.key, err = %e, "cannot release a build's claim");
                    return late;
                }
            }
        }
        late
    }
}

fn to_bytes(claim: &Claim) -> bytes::Bytes {
    bytes::Bytes::from(serde_json::to_vec(claim).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_claims_key_is_a_valid_record_key_for_any_branch() {
        let k = key("fleet", "all", "feature/x+y", &"a".repeat(40));
        assert!(k.starts_with("_claim/") && k.len() == "_claim/".len() + 32, "{k}");
        assert_ne!(k, key("fleet", "all", "feature/x+y", &"b".repeat(40)));
    }
}
