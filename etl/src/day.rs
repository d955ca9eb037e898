//! Days: the `YYYY-MM-DD` (UTC) partitions a job computes, as the S3 sink names them (`dt=`).

use std::fmt;
use std::str::FromStr;

use ktk_pipeline::time::civil_from_days;

use crate::EtlError;

/// The longest range a backfill or status takes at once (about 10 years).
pub const MAX_RANGE_DAYS: i64 = 3_660;

/// A UTC calendar day, held as days since 1970-01-01.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Day(i64);

impl Day {
    pub fn from_days(days: i64) -> Self {
        Day(days)
    }

    pub fn days(self) -> i64 {
        self.0
    }

    pub fn next(self) -> Day {
        Day(self.0 + 1)
    }

    /// The days from `from` to `to`, both included; refused when `to` is before `from` or the
    /// range is longer than [`MAX_RANGE_DAYS`].
    pub fn range(from: Day, to: Day) -> Result<Vec<Day>, EtlError> {
        if to < from {
            return Err(EtlError::BadRange(format!("--to {to} is before --from {from}")));
        }
        if to.0 - from.0 + 1 > MAX_RANGE_DAYS {
            return Err(EtlError::BadRange(format!("{from} to {to} is more than {MAX_RANGE_DAYS} days")));
        }
        Ok((from.0..=to.0).map(Day).collect())
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date, after Howard Hinnant's `days_from_civil`
/// (<https://howardhinnant.github.io/date_algorithms.html>); the inverse of `civil_from_days`.
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year.rem_euclid(400);
    let month = i64::from(month);
    let day_of_year = (153 * (if month > 2 { month - 3 } else { month + 9 }) + 2) / 5 + i64::from(day) - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

impl FromStr for Day {
    type Err = EtlError;

    /// Exactly `YYYY-MM-DD` with a real date (no `2026-02-30`), years 1970 to 9999.
    fn from_str(text: &str) -> Result<Self, EtlError> {
        let bad = || EtlError::BadDay(text.to_owned());
        let bytes = text.as_bytes();
        if bytes.len() != 10 || bytes[4] != b'-' || bytes[7] != b'-' {
            return Err(bad());
        }
        let digits = |range: std::ops::Range<usize>| -> Result<u32, EtlError> {
            let part = &text[range];
            if part.bytes().all(|b| b.is_ascii_digit()) { part.parse().map_err(|_| bad()) } else { Err(bad()) }
        };
        let (year, month, day) = (digits(0..4)?, digits(5..7)?, digits(8..10)?);
        if year < 1970 || !(1..=12).contains(&month) || day == 0 {
            return Err(bad());
        }
        let days = days_from_civil(i64::from(year), month, day);
        // A day past the month's end lands in the next month: refused.
        if civil_from_days(days) != (i64::from(year), month, day) {
            return Err(bad());
        }
        Ok(Day(days))
    }
}

impl fmt::Display for Day {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (year, month, day) = civil_from_days(self.0);
        write!(f, "{year:04}-{month:02}-{day:02}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn days_parse_and_print_back() {
        for text in ["1970-01-01", "2000-02-29", "2026-03-01", "2026-12-31", "9999-12-31"] {
            let day: Day = text.parse().expect("a day");
            assert_eq!(day.to_string(), text);
        }
        assert_eq!("1970-01-02".parse::<Day>().expect("a day").days(), 1);
        assert_eq!("2026-03-01".parse::<Day>().expect("a day").next().to_string(), "2026-03-02");
        assert_eq!("2024-12-31".parse::<Day>().expect("a day").next().to_string(), "2025-01-01");
    }

    #[test]
    fn not_days_are_refused() {
        for text in [
            "2026-02-29",
            "2026-13-01",
            "2026-00-10",
            "2026-01-00",
            "2026-1-01",
            "26-01-01",
            "2026/01/01",
            "1969-12-31",
            "2026-01-01'",
            "",
            "２０２６-01-01",
        ] {
            assert!(matches!(text.parse::<Day>(), Err(EtlError::BadDay(_))), "{text:?}");
        }
    }

    #[test]
    fn ranges_include_both_ends_and_are_bounded() {
        let from: Day = "2026-02-27".parse().expect("day");
        let to: Day = "2026-03-02".parse().expect("day");
        let days: Vec<String> = Day::range(from, to).expect("range").iter().map(Day::to_string).collect();
        assert_eq!(days, ["2026-02-27", "2026-02-28", "2026-03-01", "2026-03-02"]);
        assert!(Day::range(to, from).is_err());
        assert!(Day::range(from, Day::from_days(from.days() + MAX_RANGE_DAYS)).is_err());
    }
}
