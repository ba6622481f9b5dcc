//! Byte rates and sizes as people write them: an integer with an optional K, M or G suffix,
//! 1024-based like curl's `--limit-rate` (`1M` = 1,048,576).

use crate::error::Error;
use std::fmt;

/// Why a size or a rate did not parse; each names the text it was given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UnitError {
    /// A rate that is neither a size nor `0`/`unlimited`.
    Rate(String),
    /// A letter after the digits other than K, M or G (and an optional trailing B).
    Suffix(String, char),
    /// Not digits with an optional suffix.
    Digits(String),
    /// More than 64 bits of bytes.
    TooLarge(String),
}

impl fmt::Display for UnitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UnitError::Rate(s) => write!(
                f,
                "bad rate {s:?}: expected bytes per second like 65536, 64K, 1M, 2G, or 0/unlimited"
            ),
            UnitError::Suffix(s, c) => write!(
                f,
                "bad size {s:?}: unknown suffix {c:?}, expected K, M or G"
            ),
            UnitError::Digits(s) => write!(
                f,
                "bad size {s:?}: expected digits with an optional K, M or G"
            ),
            UnitError::TooLarge(s) => write!(f, "bad size {s:?}: too large for 64 bits"),
        }
    }
}

impl std::error::Error for UnitError {}

/// Sizes and rates come from the command line: a bad one is a usage error (exit 2). The store
/// reads them too, and words its own error around this one's text.
impl From<UnitError> for Error {
    fn from(e: UnitError) -> Error {
        Error::Usage(e.to_string())
    }
}

/// Parses a rate in bytes per second; `0` and `unlimited` mean no limit (returned as 0).
///
/// # Errors
/// [`UnitError::Rate`] for anything but digits with an optional K/M/G (any case, optional
/// trailing `B`), or a value that overflows 64 bits.
pub fn parse_rate(s: &str) -> Result<u64, UnitError> {
    if s.eq_ignore_ascii_case("unlimited") {
        return Ok(0);
    }
    parse_size(s).map_err(|_| UnitError::Rate(s.to_string()))
}

/// Parses a size in bytes: digits with an optional K/M/G suffix (1024-based).
///
/// # Errors
/// [`UnitError::Suffix`], [`UnitError::Digits`] or [`UnitError::TooLarge`].
pub fn parse_size(s: &str) -> Result<u64, UnitError> {
    let t = s.trim();
    let t = t.strip_suffix(['B', 'b']).unwrap_or(t);
    let (digits, mult) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m = match c.to_ascii_uppercase() {
                'K' => 1u64 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                _ => return Err(UnitError::Suffix(s.to_string(), c)),
            };
            (&t[..i], m)
        }
        _ => (t, 1),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(UnitError::Digits(s.to_string()));
    }
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| UnitError::TooLarge(s.to_string()))
}

/// Formats bytes in the notation [`parse_size`] reads: the largest exact suffix, else plain bytes.
pub fn format_size(n: u64) -> String {
    for (shift, suffix) in [(30, 'G'), (20, 'M'), (10, 'K')] {
        if n != 0 && n.is_multiple_of(1 << shift) {
            return format!("{}{suffix}", n >> shift);
        }
    }
    n.to_string()
}

/// Formats a rate: `unlimited` for 0, else as [`format_size`].
pub fn format_rate(bps: u64) -> String {
    if bps == 0 {
        "unlimited".to_string()
    } else {
        format_size(bps)
    }
}

/// Formats a byte count for people (not for parsing back): `1.50M`, `320K`, `12`.
pub fn human_bytes(n: u64) -> String {
    let f = n as f64;
    for (shift, suffix) in [(30, "G"), (20, "M"), (10, "K")] {
        let unit = (1u64 << shift) as f64;
        if f >= unit {
            return format!("{:.2}{suffix}", f / unit);
        }
    }
    n.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse_like_curl() {
        assert_eq!(parse_rate("1M"), Ok(1_048_576));
        assert_eq!(parse_rate("64k"), Ok(65_536));
        assert_eq!(parse_rate("2G"), Ok(2 << 30));
        assert_eq!(parse_rate("1000"), Ok(1000));
        assert_eq!(parse_rate("0"), Ok(0));
        assert_eq!(parse_rate("unlimited"), Ok(0));
        assert_eq!(parse_rate("10KB"), Ok(10_240));
        for bad in [
            "",
            "M",
            "-1",
            "1.5M",
            "1T",
            "abc",
            "99999999999999999999",
            "17179869184G",
        ] {
            assert!(parse_rate(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn sizes_say_what_was_wrong() {
        assert_eq!(parse_size("2k"), Ok(2048));
        assert_eq!(parse_size("1T"), Err(UnitError::Suffix("1T".into(), 'T')));
        assert_eq!(parse_size("1.5M"), Err(UnitError::Digits("1.5M".into())));
        assert_eq!(
            parse_size("17179869184G"),
            Err(UnitError::TooLarge("17179869184G".into()))
        );
        assert_eq!(parse_rate("x"), Err(UnitError::Rate("x".into())));
        assert_eq!(
            UnitError::Suffix("1T".into(), 'T').to_string(),
            "bad size \"1T\": unknown suffix 'T', expected K, M or G"
        );
        assert!(
            parse_rate("1T")
                .unwrap_err()
                .to_string()
                .starts_with("bad rate \"1T\": expected")
        );
    }

    #[test]
    fn formats_round_trip() {
        for n in [0u64, 1, 1000, 1024, 65536, 1_048_576, 1_500_000, 3 << 30] {
            let s = format_rate(n);
            assert_eq!(parse_rate(&s), Ok(n), "{s}");
        }
        assert_eq!(format_rate(1_048_576), "1M");
        assert_eq!(format_rate(0), "unlimited");
        assert_eq!(human_bytes(1536), "1.50K");
    }
}
