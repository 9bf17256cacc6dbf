//! Schedules for periodic work (garbage collection): classic five-field cron expressions in UTC
//! (`minute hour day-of-month month day-of-week`, each `*`, a number, a range `a-b`, a list
//! `a,b`, with optional steps `*/n` or `a-b/n`; Sunday is 0 or 7; when both day fields are
//! restricted either may match, as in cron), or `@every <duration>` (e.g. `@every 6h`), plus the
//! shorthands `@hourly`, `@daily`, `@weekly`, `@monthly`.

use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Schedule {
    Cron(Box<CronFields>),
    Every(Duration),
}

/// Allowed values of each field (bit sets).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CronFields {
    minute: u64,
    hour: u32,
    dom: u32,
    month: u16,
    dow: u8,
    dom_any: bool,
    dow_any: bool,
}

fn field(s: &str, lo: u32, hi: u32, what: &str) -> Result<(u64, bool), String> {
    let mut bits = 0u64;
    let any = s == "*";
    for part in s.split(',') {
        let (range, step) = match part.split_once('/') {
            Some((r, st)) => (
                r,
                st.parse::<u32>()
                    .ok()
                    .filter(|v| *v > 0)
                    .ok_or_else(|| format!("{what}: bad step in '{part}'"))?,
            ),
            None => (part, 1),
        };
        let (a, b) = if range == "*" {
            (lo, hi)
        } else if let Some((a, b)) = range.split_once('-') {
            (
                a.parse().map_err(|_| format!("{what}: '{part}'"))?,
                b.parse().map_err(|_| format!("{what}: '{part}'"))?,
            )
        } else {
            let v: u32 = range.parse().map_err(|_| format!("{what}: '{part}'"))?;
            (v, if part.contains('/') { hi } else { v })
        };
        if a < lo || b > hi || a > b {
            return Err(format!("{what}: '{part}' is outside {lo}-{hi}"));
        }
        let mut v = a;
        while v <= b {
            bits |= 1 << v;
            v += step;
        }
    }
    Ok((bits, any))
}

impl Schedule {
    pub fn parse(s: &str) -> Result<Schedule, String> {
        let s = s.trim();
        let expr = match s {
            "@hourly" => "0 * * * *",
            "@daily" | "@midnight" => "0 0 * * *",
            "@weekly" => "0 0 * * 0",
            "@monthly" => "0 0 1 * *",
            _ => s,
        };
        if let Some(d) = expr.strip_prefix("@every ") {
            let d = crate::timefmt::parse_duration(d.trim()).map_err(|e| format!("@every: {e}"))?;
            if d.is_zero() {
                return Err("@every: the interval must be positive".into());
            }
            return Ok(Schedule::Every(d));
        }
        let f: Vec<&str> = expr.split_whitespace().collect();
        if f.len() != 5 {
            return Err(format!(
                "'{s}': five fields (minute hour day-of-month month day-of-week), or @every <duration>"
            ));
        }
        let (minute, _) = field(f[0], 0, 59, "minute")?;
        let (hour, _) = field(f[1], 0, 23, "hour")?;
        let (dom, dom_any) = field(f[2], 1, 31, "day of month")?;
        let (month, _) = field(f[3], 1, 12, "month")?;
        let (mut dow, dow_any) = field(f[4], 0, 7, "day of week")?;
        if dow & (1 << 7) != 0 {
            dow |= 1; // 7 is Sunday too
        }
        Ok(Schedule::Cron(Box::new(CronFields {
            minute,
            hour: hour as u32,
            dom: dom as u32,
            month: month as u16,
            dow: (dow & 0x7f) as u8,
            dom_any,
            dow_any,
        })))
    }

    /// The first due time strictly after `after` (UNIX seconds), given the previous run at
    /// `last` (for `@every`). `None` if a cron expression never matches (e.g. 31 February).
    pub fn next(&self, after: i64, last: i64) -> Option<i64> {
        match self {
            Schedule::Every(d) => Some((last + d.as_secs().max(1) as i64).max(after + 1)),
            Schedule::Cron(c) => {
                let mut t = (after / 60 + 1) * 60;
                // Five years of minutes at most.
                for _ in 0..(5 * 366 * 24 * 60) {
                    if c.matches(t) {
                        return Some(t);
                    }
                    t += 60;
                }
                None
            }
        }
    }
}

impl CronFields {
    fn matches(&self, t: i64) -> bool {
        let days = t.div_euclid(86400);
        let secs = t.rem_euclid(86400);
        let (minute, hour) = ((secs / 60) % 60, secs / 3600);
        let (_, month, dom) = civil_from_days(days);
        let dow = (days + 4).rem_euclid(7); // 1970-01-01 was a Thursday
        let day_ok = match (self.dom_any, self.dow_any) {
            (true, true) => true,
            (false, true) => self.dom & (1 << dom) != 0,
            (true, false) => self.dow & (1 << dow) != 0,
            (false, false) => self.dom & (1 << dom) != 0 || self.dow & (1 << dow) != 0,
        };
        self.minute & (1 << minute) != 0
            && self.hour & (1 << hour) != 0
            && self.month & (1 << month) != 0
            && day_ok
    }
}

/// (year, month 1-12, day 1-31) of a day count since 1970-01-01 (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    // 2026-11-26 17:23:00 UTC, a Thursday.
    const T: i64 = 1795713780;

    #[test]
    fn cron_next_times() {
        let s = Schedule::parse("0 3 * * *").unwrap();
        assert_eq!(s.next(T, 0), Some(1795748400)); // 2026-11-27 03:00
        let s = Schedule::parse("*/15 * * * *").unwrap();
        assert_eq!(s.next(T, 0), Some(T - 23 * 60 + 30 * 60)); // 17:30
        let s = Schedule::parse("30 2 * * 0").unwrap(); // Sundays 02:30
        assert_eq!(s.next(T, 0), Some(1795919400)); // 2026-11-29 02:30
        let s = Schedule::parse("0 0 1 1 *").unwrap();
        assert_eq!(s.next(T, 0), Some(1798761600)); // 2027-01-01
        assert_eq!(
            Schedule::parse("@daily").unwrap().next(T, 0),
            Some(1795737600)
        );
        assert_eq!(Schedule::parse("0 0 31 2 *").unwrap().next(T, 0), None);
        let e = Schedule::parse("@every 90s").unwrap();
        assert_eq!(e.next(T, T - 30), Some(T + 60));
        assert_eq!(e.next(T, 0), Some(T + 1));
    }

    #[test]
    fn bad_expressions_say_why() {
        for (s, want) in [
            ("0 3 * *", "five fields"),
            ("61 * * * *", "minute"),
            ("0 24 * * *", "hour"),
            ("0 0 0 * *", "day of month"),
            ("*/0 * * * *", "step"),
            ("@every 0s", "positive"),
            ("@every soon", "@every"),
        ] {
            let e = Schedule::parse(s).unwrap_err();
            assert!(e.contains(want), "{s}: {e}");
        }
    }
}
