//! Duration fields: Go-style strings (`30s`, `1h30m`, `2ms`) as Kubernetes writes them.
//!
//! They stay strings in the API so `kubectl explain` and the API server's CEL `duration()`
//! function see the same text the user wrote; [`parse`] turns them into
//! [`std::time::Duration`] for the operator and the scorer.

use std::time::Duration;

/// The schema pattern every duration field carries, so a malformed value is rejected by the
/// API server with the field's path before any CEL rule runs.
pub const DURATION_PATTERN: &str = r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$";

/// A duration string could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid duration {value:?}: expected a Go duration such as 30s, 1h30m or 250ms")]
pub struct DurationError {
    /// The rejected text.
    pub value: String,
}

/// Parses a Go-style duration (`1h30m`, `2.5s`, `100ms`), the format of [`DURATION_PATTERN`].
pub fn parse(value: &str) -> Result<Duration, DurationError> {
    let error = || DurationError {
        value: value.to_string(),
    };
    if value.is_empty() {
        return Err(error());
    }
    let mut total = Duration::ZERO;
    let mut rest = value;
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(error)?;
        let (number, tail) = rest.split_at(number_len);
        let number: f64 = number.parse().map_err(|_| error())?;
        let unit_len = tail
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_len);
        let seconds_per_unit = match unit {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(error()),
        };
        total += Duration::try_from_secs_f64(number * seconds_per_unit).map_err(|_| error())?;
        rest = tail;
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_go_durations() {
        assert_eq!(parse("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse("2ms"), Ok(Duration::from_millis(2)));
        assert_eq!(parse("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse("250us"), Ok(Duration::from_micros(250)));
        assert_eq!(parse("24h"), Ok(Duration::from_secs(86_400)));
    }

    #[test]
    fn rejects_what_go_rejects() {
        for bad in ["", "10", "1d", "h", "1h-5m", "1..5s", "5 s", "-1s"] {
            assert!(parse(bad).is_err(), "{bad:?} should be rejected");
        }
    }
}
