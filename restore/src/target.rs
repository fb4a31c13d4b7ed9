//! Recovery targets as people type them, and as PostgreSQL's recovery settings spell them.

use std::time::Duration;

use walfmt::{Lsn, PgTimestamp};

/// Where recovery should stop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Replay all archived WAL.
    End,
    /// As soon as the backup is consistent.
    Immediate,
    /// At this time (`recovery_target_time`).
    Time(PgTimestamp),
    /// At this WAL position.
    Lsn(Lsn),
    /// At the commit of this transaction.
    Xid(String),
    /// At this restore point (`pg_create_restore_point`).
    Name(String),
}

/// A target time that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TimeError {
    /// No zone: ambiguous.
    #[error("target time \"{0}\" has no time zone")]
    NoZone(String),
    /// Not a time.
    #[error("invalid target time \"{0}\"")]
    Invalid(String),
}

impl TimeError {
    /// What the operator can do about it.
    pub fn hint(&self) -> &'static str {
        match self {
            TimeError::NoZone(_) => {
                "add the zone, as in \"2026-05-14 03:00:00+00\" or \"2026-05-14T03:00:00Z\" for UTC"
            }
            TimeError::Invalid(_) => {
                "give a time with its zone (\"2026-05-14 03:00:00+02\", RFC 3339) or a relative one (\"15m ago\")"
            }
        }
    }
}

/// Parses `2026-05-14 03:00:00+00`, RFC 3339 (`2026-05-14T03:00:00.5Z`), `... UTC`, `now`,
/// and relative times (`15m ago`, `1h 30m ago`).
pub fn parse_time(text: &str) -> Result<PgTimestamp, TimeError> {
    let t = text.trim();
    let invalid = || TimeError::Invalid(text.to_owned());
    if t.eq_ignore_ascii_case("now") {
        return Ok(PgTimestamp::now());
    }
    if let Some(ago) = t.strip_suffix("ago") {
        let d: Duration = humantime::parse_duration(ago.trim()).map_err(|_| invalid())?;
        return Ok(PgTimestamp::from_unix_micros(
            PgTimestamp::now().unix_micros() - d.as_micros() as i64,
        ));
    }
    let b = t.as_bytes();
    let num = |r: std::ops::Range<usize>| -> Result<u32, TimeError> {
        let s = t.get(r).ok_or_else(invalid)?;
        if s.is_empty() || !s.bytes().all(|c| c.is_ascii_digit()) {
            return Err(invalid());
        }
        s.parse().map_err(|_| invalid())
    };
    if b.len() < 16
        || b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b' ' | b'T' | b't')
        || b[13] != b':'
    {
        return Err(invalid());
    }
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, minute) = (num(11..13)?, num(14..16)?);
    let mut i = 16;
    let mut second = 0;
    let mut micros = 0;
    if b.get(i) == Some(&b':') {
        second = num(i + 1..i + 3)?;
        i += 3;
        if b.get(i) == Some(&b'.') {
            let start = i + 1;
            let mut end = start;
            while b.get(end).is_some_and(u8::is_ascii_digit) {
                end += 1;
            }
            let frac = t
                .get(start..end)
                .filter(|f| !f.is_empty())
                .ok_or_else(invalid)?;
            let six: String = frac.chars().chain("000000".chars()).take(6).collect();
            micros = six.parse().map_err(|_| invalid())?;
            i = end;
        }
    }
    let zone = t[i..].trim();
    let offset_secs: i64 = if zone.is_empty() {
        return Err(TimeError::NoZone(text.to_owned()));
    } else if zone.eq_ignore_ascii_case("z")
        || zone.eq_ignore_ascii_case("utc")
        || zone.eq_ignore_ascii_case("gmt")
    {
        0
    } else {
        let (sign, rest) = match zone.as_bytes()[0] {
            b'+' => (1, &zone[1..]),
            b'-' => (-1, &zone[1..]),
            _ => return Err(invalid()),
        };
        let digits: String = rest.chars().filter(|&c| c != ':').collect();
        if !digits.bytes().all(|c| c.is_ascii_digit()) || !matches!(digits.len(), 2 | 4) {
            return Err(invalid());
        }
        let h: i64 = digits[..2].parse().map_err(|_| invalid())?;
        let m: i64 = if digits.len() == 4 {
            digits[2..].parse().map_err(|_| invalid())?
        } else {
            0
        };
        if h > 15 || m > 59 {
            return Err(invalid());
        }
        sign * (h * 3600 + m * 60)
    };
    let local = PgTimestamp::from_utc(
        (i64::from(year), month, day),
        (hour, minute, second),
        micros,
    )
    .ok_or_else(invalid)?;
    Ok(PgTimestamp::from_unix_micros(
        local.unix_micros() - offset_secs * 1_000_000,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_forms_people_type() {
        let utc = "2026-05-14T03:00:00.000000Z";
        for text in [
            "2026-05-14 03:00:00+00",
            "2026-05-14T03:00:00Z",
            "2026-05-14 03:00:00 UTC",
            "2026-05-14 05:00:00+02",
            "2026-05-14 05:00+02:00",
            "2026-05-13 22:30:00-0430",
            "2026-05-14t03:00:00.000z",
        ] {
            assert_eq!(parse_time(text).unwrap().to_string(), utc, "{text}");
        }
        assert_eq!(
            parse_time("2026-05-14 03:00:00.1234567+00")
                .unwrap()
                .to_string(),
            "2026-05-14T03:00:00.123456Z"
        );
        let ago = parse_time("15m ago").unwrap();
        let expect = PgTimestamp::now().unix_micros() - 15 * 60 * 1_000_000;
        assert!((ago.unix_micros() - expect).abs() < 5_000_000);
    }

    #[test]
    fn no_zone_and_nonsense_are_refused() {
        assert_eq!(
            parse_time("2026-05-14 03:00:00"),
            Err(TimeError::NoZone("2026-05-14 03:00:00".into()))
        );
        for bad in [
            "yesterday",
            "2026-05-14",
            "2026-02-30 00:00:00Z",
            "2026-05-14 03:00:00+99",
            "x ago",
        ] {
            assert!(
                matches!(parse_time(bad), Err(TimeError::Invalid(_))),
                "{bad}"
            );
        }
    }
}
