//! Unix time as UTC calendar text, for people: dates in branch names, times on the fleet page.
//!
//! Pure; the civil-from-days conversion is Howard Hinnant's algorithm.

/// `(year, month, day)` of the UTC day `unix` falls in.
pub fn date(unix: i64) -> (i64, u32, u32) {
    let z = unix.div_euclid(86_400) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// `YYYY-MM-DD`.
pub fn day(unix: i64) -> String {
    let (y, m, d) = date(unix);
    format!("{y:04}-{m:02}-{d:02}")
}

/// `YYYY-MM-DD HH:MM UTC`.
pub fn minute(unix: i64) -> String {
    let secs = unix.rem_euclid(86_400);
    format!("{} {:02}:{:02} UTC", day(unix), secs / 3600, secs % 3600 / 60)
}

/// Now, in unix seconds.
pub fn now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_dates() {
        assert_eq!(day(0), "1970-01-01");
        assert_eq!(minute(1_764_115_200 + 3600 + 120), "2025-11-26 01:02 UTC");
        assert_eq!(day(951_782_400), "2000-02-29");
    }
}
