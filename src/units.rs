//! Byte rates and sizes as people write them: an integer with an optional K, M or G suffix,
//! 1024-based like curl's `--limit-rate` (`1M` = 1,048,576).

/// Parses a rate in bytes per second; `0` and `unlimited` mean no limit (returned as 0).
///
/// # Errors
/// Anything but digits with an optional K/M/G (any case, optional trailing `B`), or a value that
/// overflows 64 bits; the message names the accepted forms.
pub fn parse_rate(s: &str) -> Result<u64, String> {
    if s.eq_ignore_ascii_case("unlimited") {
        return Ok(0);
    }
    parse_size(s).map_err(|_| {
        format!("bad rate {s:?}: expected bytes per second like 65536, 64K, 1M, 2G, or 0/unlimited")
    })
}

/// Parses a size in bytes: digits with an optional K/M/G suffix (1024-based).
///
/// # Errors
/// Anything else, or overflow.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let t = t.strip_suffix(['B', 'b']).unwrap_or(t);
    let (digits, mult) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m = match c.to_ascii_uppercase() {
                'K' => 1u64 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                _ => return Err(format!("bad size {s:?}: unknown suffix {c:?}")),
            };
            (&t[..i], m)
        }
        _ => (t, 1),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!(
            "bad size {s:?}: expected digits with an optional K, M or G"
        ));
    }
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("bad size {s:?}: too large"))
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
