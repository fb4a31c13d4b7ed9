//! PostgreSQL timestamps (TimestampTz: microseconds since 2000-01-01 00:00:00 UTC).

use std::fmt;

/// Microseconds between the Unix epoch and PostgreSQL's (2000-01-01).
const PG_EPOCH_UNIX_MICROS: i64 = 946_684_800_000_000;

/// A TimestampTz as stored in WAL. Displays as RFC 3339 in UTC with microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PgTimestamp(pub i64);

impl PgTimestamp {
    /// Microseconds since the Unix epoch.
    pub fn unix_micros(self) -> i64 {
        self.0.saturating_add(PG_EPOCH_UNIX_MICROS)
    }

    /// The current time (the system clock).
    pub fn now() -> PgTimestamp {
        let micros = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as i64);
        PgTimestamp::from_unix_micros(micros)
    }

    /// From microseconds since the Unix epoch.
    pub fn from_unix_micros(micros: i64) -> PgTimestamp {
        PgTimestamp(micros.saturating_sub(PG_EPOCH_UNIX_MICROS))
    }
}

impl fmt::Display for PgTimestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let micros = self.unix_micros();
        let secs = micros.div_euclid(1_000_000);
        let frac = micros.rem_euclid(1_000_000);
        let days = secs.div_euclid(86_400);
        let sod = secs.rem_euclid(86_400);
        let (y, m, d) = civil_from_days(days);
        write!(
            f,
            "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{frac:06}Z",
            sod / 3600,
            sod % 3600 / 60,
            sod % 60
        )
    }
}

impl PgTimestamp {
    /// A UTC date and time (month 1..=12, day 1..=31, hour 0..=23, ...), None if out of range.
    pub fn from_utc(
        (year, month, day): (i64, u32, u32),
        (hour, minute, second): (u32, u32, u32),
        micros: u32,
    ) -> Option<PgTimestamp> {
        if !(1..=12).contains(&month)
            || !(1..=31).contains(&day)
            || hour > 23
            || minute > 59
            || second > 60
            || micros > 999_999
        {
            return None;
        }
        let days = days_from_civil(year, month, day);
        if civil_from_days(days) != (year, month, day) {
            return None; // 31 April, 29 February of a common year
        }
        let secs = days * 86_400 + i64::from(hour * 3600 + minute * 60 + second);
        Some(PgTimestamp::from_unix_micros(
            secs.checked_mul(1_000_000)? + i64::from(micros),
        ))
    }

    /// As PostgreSQL reads a timestamptz in UTC: `2026-05-14 03:00:00.123456+00`.
    pub fn to_pg_utc(self) -> String {
        let s = self.to_string();
        format!("{} {}+00", &s[..10], &s[11..26])
    }
}

/// Day count from 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = i64::from((m + 9) % 12);
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Proleptic Gregorian date of a day count from 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_rfc3339_utc_micros() {
        assert_eq!(PgTimestamp(0).to_string(), "2000-01-01T00:00:00.000000Z");
        assert_eq!(PgTimestamp(-1).to_string(), "1999-12-31T23:59:59.999999Z");
        // 2026-05-14T03:00:00.123456Z is 1778727600.123456 s after the Unix epoch.
        let t = PgTimestamp::from_unix_micros(1_778_727_600_123_456);
        assert_eq!(t.to_string(), "2026-05-14T03:00:00.123456Z");
        assert_eq!(
            PgTimestamp::from_unix_micros(951_782_400_000_000).to_string(),
            "2000-02-29T00:00:00.000000Z"
        );
    }

    #[test]
    fn civil_times_round_trip() {
        let t = PgTimestamp::from_utc((2026, 5, 14), (3, 0, 0), 123_456).unwrap();
        assert_eq!(t.unix_micros(), 1_778_727_600_123_456);
        assert_eq!(t.to_pg_utc(), "2026-05-14 03:00:00.123456+00");
        for days in [-800_000i64, -1, 0, 59, 10_956, 20_000, 2_000_000] {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
        assert!(PgTimestamp::from_utc((2026, 2, 29), (0, 0, 0), 0).is_none());
        assert!(PgTimestamp::from_utc((2024, 2, 29), (0, 0, 0), 0).is_some());
        assert!(PgTimestamp::from_utc((2026, 13, 1), (0, 0, 0), 0).is_none());
    }
}
