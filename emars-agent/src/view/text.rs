//! Numbers and times as people read them, text from the agent made safe for a terminal, and
//! aligned text tables: shared by the CLI's renderings, `emars tune`'s table and the plots'
//! labels.

/// `b` in B below 1 KiB, else in KiB/MiB/GiB/TiB/PiB with one decimal: `1536` → `"1.5 KiB"`.
pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if b < 1024 {
        return format!("{b} B");
    }
    let mut value = b as f64 / 1024.0;
    let mut unit = 0;
    // Compare the rounded value so that 1023.96 KiB shows as "1.0 MiB", not "1024.0 KiB".
    while (value * 10.0).round() / 10.0 >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// `n` and its noun, singular for one: `count(1, "hour", "hours")` is `"1 hour"`.
pub fn count(n: u64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// A span of milliseconds in its largest whole unit: `90_000` → `"90 s"`, `7_200_000` →
/// `"2 h"`, `0` → `"0"`.
pub fn human_ms(ms: u64) -> String {
    const UNITS: [(u64, &str); 4] = [
        (86_400_000, "d"),
        (3_600_000, "h"),
        (60_000, "min"),
        (1000, "s"),
    ];
    if ms == 0 {
        return "0".to_owned();
    }
    for (size, unit) in UNITS {
        if ms.is_multiple_of(size) {
            return format!("{} {unit}", ms / size);
        }
    }
    format!("{ms} ms")
}

/// `ms` (unix milliseconds) as `YYYY-MM-DD HH:MM:SS` UTC; `-` for 0 (never).
pub fn format_time_ms(ms: u64) -> String {
    if ms == 0 {
        return "-".to_string();
    }
    let secs = ms / 1000;
    let (y, m, d) = civil_from_days((secs / 86_400) as i64);
    let s = secs % 86_400;
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        s / 3600,
        s / 60 % 60,
        s % 60
    )
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (H. Hinnant's algorithm).
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

/// Text from the agent with control characters escaped, so it cannot drive the terminal.
pub fn clean(s: &str) -> String {
    if !s.chars().any(char::is_control) {
        return s.to_string();
    }
    s.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// Column alignment of [`table`].
#[derive(Clone, Copy, PartialEq)]
pub enum Align {
    Left,
    Right,
}

/// An aligned text table: two spaces between columns, no trailing spaces.
pub fn table(headers: &[(&str, Align)], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|(h, _)| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let header_row: Vec<String> = headers.iter().map(|(h, _)| h.to_string()).collect();
    for row in std::iter::once(&header_row).chain(rows) {
        let mut line = String::new();
        for (i, ((cell, (_, align)), w)) in row.iter().zip(headers).zip(&widths).enumerate() {
            if i > 0 {
                line.push_str("  ");
            }
            let pad = w.saturating_sub(cell.chars().count());
            match align {
                Align::Left => {
                    line.push_str(cell);
                    line.extend(std::iter::repeat_n(' ', pad));
                }
                Align::Right => {
                    line.extend(std::iter::repeat_n(' ', pad));
                    line.push_str(cell);
                }
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_bytes_units() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1024), "1.0 KiB");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(10 << 20), "10.0 MiB");
        assert_eq!(human_bytes((1 << 20) - 1), "1.0 MiB");
        assert_eq!(human_bytes(3 << 29), "1.5 GiB");
        assert_eq!(human_bytes(5 << 40), "5.0 TiB");
        assert_eq!(human_bytes(u64::MAX), "16384.0 PiB");
    }

    #[test]
    fn time_format() {
        assert_eq!(format_time_ms(0), "-");
        assert_eq!(format_time_ms(1), "1970-01-01 00:00:00");
        assert_eq!(format_time_ms(1_700_000_000_123), "2023-11-14 22:13:20");
        assert_eq!(format_time_ms(951_825_600_000), "2000-02-29 12:00:00");
    }

    #[test]
    fn counts_are_singular_for_one() {
        assert_eq!(count(1, "hour", "hours"), "1 hour");
        assert_eq!(count(0, "hour", "hours"), "0 hours");
        assert_eq!(count(2, "OOM kill", "OOM kills"), "2 OOM kills");
        assert_eq!(count(1, "OOM kill", "OOM kills"), "1 OOM kill");
    }

    #[test]
    fn spans_in_their_largest_whole_unit() {
        assert_eq!(human_ms(0), "0");
        assert_eq!(human_ms(1500), "1500 ms");
        assert_eq!(human_ms(90_000), "90 s");
        assert_eq!(human_ms(60_000), "1 min");
        assert_eq!(human_ms(14_400_000), "4 h");
        assert_eq!(human_ms(86_400_000), "1 d");
    }
}
