//! Durations and sizes written as text in configuration files (`120s`, `10m`, `7d`, `64MiB`).

/// Parses `<n>[ms|s|m|h|d]` (a bare number is seconds).
pub use prepub_core::timefmt::parse_duration;

/// Parses `<n>[B|KiB|MiB|GiB|TiB|KB|MB|GB|TB]` (a bare number is bytes).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, unit) = split_num(t);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a size like 512MiB or 50GiB"))?;
    let mult: f64 = match unit {
        "" | "B" => 1.0,
        "KiB" | "K" => 1024.0,
        "MiB" | "M" => 1024.0 * 1024.0,
        "GiB" | "G" => 1024.0 * 1024.0 * 1024.0,
        "TiB" | "T" => 1024.0f64.powi(4),
        "KB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "TB" => 1e12,
        _ => return Err(format!("'{s}': unknown size unit '{unit}'")),
    };
    let v = n * mult;
    if !(0.0..=1.8e19).contains(&v) {
        return Err(format!("'{s}' is out of range"));
    }
    Ok(v as u64)
}

fn split_num(t: &str) -> (&str, &str) {
    let i = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    (t[..i].trim(), t[i..].trim())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn parses_units() {
        assert_eq!(parse_duration("120s").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("10m").unwrap(), Duration::from_secs(600));
        assert_eq!(parse_duration("7d").unwrap(), Duration::from_secs(604_800));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert!(parse_duration("5 fortnights").is_err());
        assert_eq!(parse_size("64MiB").unwrap(), 64 << 20);
        assert_eq!(parse_size("50GiB").unwrap(), 50 << 30);
        assert_eq!(parse_size("1000").unwrap(), 1000);
        assert!(parse_size("lots").is_err());
    }
}
