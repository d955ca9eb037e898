//! Time conversions the pipeline's sinks share: Unix milliseconds to and from `SystemTime`, and
//! UTC civil dates (S3 partitions `dt=`/`hour=`, MySQL `DATETIME` literals).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Milliseconds in an hour.
pub const MS_PER_HOUR: i64 = 3_600_000;
/// Milliseconds in a day.
pub const MS_PER_DAY: i64 = 24 * MS_PER_HOUR;

/// Milliseconds since the Unix epoch, rounded down (also before 1970); saturates at `i64`'s ends.
pub fn unix_millis(time: SystemTime) -> i64 {
    match time.duration_since(UNIX_EPOCH) {
        Ok(after) => i64::try_from(after.as_millis()).unwrap_or(i64::MAX),
        Err(before) => {
            let before = before.duration();
            let ms = i64::try_from(before.as_millis()).unwrap_or(i64::MAX);
            if before.subsec_nanos() % 1_000_000 == 0 { -ms } else { -ms.saturating_add(1) }
        }
    }
}

/// The time `ms` milliseconds after (or, negative, before) the Unix epoch.
pub fn from_unix_millis(ms: i64) -> SystemTime {
    if ms >= 0 {
        UNIX_EPOCH + Duration::from_millis(ms.unsigned_abs())
    } else {
        UNIX_EPOCH - Duration::from_millis(ms.unsigned_abs())
    }
}

/// The proleptic Gregorian (year, month, day) of a day counted from 1970-01-01, after Howard
/// Hinnant's `civil_from_days` (<https://howardhinnant.github.io/date_algorithms.html>).
pub fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era = (day_of_era - day_of_era / 1_460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 { month_index + 3 } else { month_index - 9 };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month as u32, day as u32)
}

/// `YYYY-MM-DD` and the hour (UTC) of a Unix time in milliseconds; times before 1970 work too.
pub fn date_and_hour(ms: i64) -> (String, u32) {
    let (year, month, day) = civil_from_days(ms.div_euclid(MS_PER_DAY));
    let hour = ms.rem_euclid(MS_PER_DAY) / MS_PER_HOUR;
    (format!("{year:04}-{month:02}-{day:02}"), hour as u32)
}

/// `YYYY-MM-DD HH:MM:SS.mmm` (UTC) of a Unix time in milliseconds.
pub fn datetime_millis(ms: i64) -> String {
    let (year, month, day) = civil_from_days(ms.div_euclid(MS_PER_DAY));
    let in_day = ms.rem_euclid(MS_PER_DAY);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}.{:03}",
        in_day / MS_PER_HOUR,
        in_day / 60_000 % 60,
        in_day / 1000 % 60,
        in_day % 1000
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn milliseconds_round_down_on_both_sides_of_the_epoch() {
        assert_eq!(unix_millis(UNIX_EPOCH + Duration::from_micros(1_500)), 1);
        assert_eq!(unix_millis(UNIX_EPOCH - Duration::from_micros(1_500)), -2);
        assert_eq!(unix_millis(UNIX_EPOCH - Duration::from_millis(2)), -2);
        for ms in [-86_400_001, -1, 0, 1, 1_700_000_000_123] {
            assert_eq!(unix_millis(from_unix_millis(ms)), ms);
        }
    }

    #[test]
    fn dates_and_hours_are_utc_civil_dates() {
        assert_eq!(date_and_hour(0), ("1970-01-01".into(), 0));
        assert_eq!(date_and_hour(-1), ("1969-12-31".into(), 23));
        assert_eq!(date_and_hour(951_782_400_000), ("2000-02-29".into(), 0));
        assert_eq!(date_and_hour(1_709_251_199_999), ("2024-02-29".into(), 23));
        assert_eq!(date_and_hour(1_709_251_200_000), ("2024-03-01".into(), 0));
        assert_eq!(date_and_hour(4_102_444_800_000), ("2100-01-01".into(), 0));
        assert_eq!(date_and_hour(253_402_300_799_999), ("9999-12-31".into(), 23));
        assert_eq!(datetime_millis(1_709_251_199_999), "2024-02-29 23:59:59.999");
        assert_eq!(datetime_millis(-1), "1969-12-31 23:59:59.999");
    }

    #[test]
    fn civil_days_are_consecutive_over_eight_centuries() {
        let mut previous = civil_from_days(-146_097 * 2 - 1);
        for days in -146_097 * 2..146_097 * 2 {
            let (year, month, day) = civil_from_days(days);
            let next_day = (year, month, day) == (previous.0, previous.1, previous.2 + 1);
            let next_month = day == 1 && ((year, month) == (previous.0, previous.1 + 1));
            let next_year = (month, day) == (1, 1) && year == previous.0 + 1 && previous.1 == 12;
            assert!(next_day || next_month || next_year, "{previous:?} -> {year}-{month}-{day}");
            previous = (year, month, day);
        }
    }
}
