//! What every configuration section's validation shares: the error that names the key or file
//! and the reason, and the range check. `config.rs` and `builder/config.rs` both import from
//! here, so neither imports the other's helpers.

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: {reason}")]
    File { file: String, reason: String },
    #[error("{key}: {reason}")]
    Value { key: &'static str, reason: String },
}

/// Checks that a number lies in `range`.
pub fn in_range<T: PartialOrd + std::fmt::Display>(
    key: &'static str,
    value: T,
    range: std::ops::RangeInclusive<T>,
) -> Result<T, ConfigError> {
    if range.contains(&value) {
        Ok(value)
    } else {
        Err(ConfigError::Value {
            key,
            reason: format!("{value} is out of range: {} to {}", range.start(), range.end()),
        })
    }
}
