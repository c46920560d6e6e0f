//! Sizes as people write them: the one parser behind every size the CLI and the config take
//! (`set-limit --max`, `tune --limits`, every `*_bytes` key of the config).
//!
//! The forms are Kubernetes' quantities, which the operators of container platforms already
//! write in their manifests:
//!
//! - a plain integer is bytes: `67108864`;
//! - `k` (or `K`), `M`, `G`, `T`, `P`, `E` are powers of 1000: `64M` = 64,000,000;
//! - `Ki`, `Mi`, `Gi`, `Ti`, `Pi`, `Ei` are powers of 1024: `64Mi` = 67,108,864;
//! - a decimal fraction with a unit, `1.5Gi`, is rounded up to a whole byte (as Kubernetes
//!   rounds a memory quantity); a fraction without a unit is refused (bytes are whole).
//!
//! Units are case-sensitive beyond `k`/`K` (Kubernetes' `m` is a thousandth, not a mega), and
//! `MB`, `MiB`, signs, exponents and spaces are refused, each with the form to write instead.

/// The accepted forms, for error messages and help texts.
pub const SIZE_FORMS: &str = "a size is bytes (67108864) or a number with a unit: Ki, Mi, Gi, \
    Ti (powers of 1024: 64Mi, 1.5Gi) or k, M, G, T (powers of 1000: 64M), as Kubernetes writes \
    memory";

/// Units and their multipliers.
const UNITS: [(&str, u64); 13] = [
    ("k", 1_000),
    ("K", 1_000),
    ("M", 1_000_000),
    ("G", 1_000_000_000),
    ("T", 1_000_000_000_000),
    ("P", 1_000_000_000_000_000),
    ("E", 1_000_000_000_000_000_000),
    ("Ki", 1 << 10),
    ("Mi", 1 << 20),
    ("Gi", 1 << 30),
    ("Ti", 1 << 40),
    ("Pi", 1 << 50),
    ("Ei", 1 << 60),
];

/// More decimals than this say nothing about a byte count (and would overflow the sums).
const MAX_DECIMALS: usize = 18;

/// Why a text is not a size; shown with [`SIZE_FORMS`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{why}; {SIZE_FORMS}")]
pub struct SizeError {
    why: String,
}

impl SizeError {
    fn new(why: impl Into<String>) -> SizeError {
        SizeError { why: why.into() }
    }

    /// What was wrong, without the accepted forms.
    pub fn why(&self) -> &str {
        &self.why
    }
}

/// `text` (surrounding whitespace ignored) in bytes; see the module's documentation.
pub fn parse_size(text: &str) -> Result<u64, SizeError> {
    let s = text.trim();
    if s.is_empty() {
        return Err(SizeError::new("empty"));
    }
    if s.starts_with('-') {
        return Err(SizeError::new("negative"));
    }
    let end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, unit) = s.split_at(end);
    if number.is_empty() {
        return Err(SizeError::new("no number"));
    }
    let multiplier = match UNITS.iter().find(|(u, _)| *u == unit) {
        Some((_, m)) => *m,
        None if unit.is_empty() => 1,
        None => return Err(SizeError::new(unit_hint(unit))),
    };
    let (whole, decimals) = number.split_once('.').unwrap_or((number, ""));
    let digits = |d: &str| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit());
    let well_formed =
        digits(whole) && (!number.contains('.') || digits(decimals)) && !decimals.contains('.');
    if !well_formed {
        return Err(SizeError::new(format!("{number:?} is not a number")));
    }
    if !decimals.is_empty() && unit.is_empty() {
        return Err(SizeError::new(
            "a fraction of a byte (bytes are whole; a fraction needs a unit: 1.5Gi)",
        ));
    }
    if decimals.len() > MAX_DECIMALS {
        return Err(SizeError::new(format!("more than {MAX_DECIMALS} decimals")));
    }
    let too_large = || SizeError::new(format!("too large (the largest is {} bytes)", u64::MAX));
    let whole: u64 = whole.parse().map_err(|_| too_large())?;
    let mut bytes = whole.checked_mul(multiplier).ok_or_else(too_large)?;
    if !decimals.is_empty() {
        // decimals / 10^n of the unit, rounded up: exact in u128 (10^18 × 2^60 < 2^128).
        let scale = 10u128.pow(decimals.len() as u32);
        let numerator: u128 = decimals.parse().map_err(|_| too_large())?;
        let part = (numerator * u128::from(multiplier)).div_ceil(scale);
        let part = u64::try_from(part).map_err(|_| too_large())?;
        bytes = bytes.checked_add(part).ok_or_else(too_large)?;
    }
    Ok(bytes)
}

/// [`parse_size`] for clap's `value_parser`: the error is the message clap shows after the
/// flag and the value.
pub fn parse_size_arg(text: &str) -> Result<u64, String> {
    parse_size(text).map_err(|e| e.to_string())
}

/// Why `unit` is not one, with the unit the writer most likely meant.
fn unit_hint(unit: &str) -> String {
    if unit.starts_with(char::is_whitespace) {
        return format!("unknown unit {unit:?}: write the unit right after the number (64Mi)");
    }
    if let Some(stem) = unit.strip_suffix(['B', 'b']) {
        let binary = stem.strip_suffix('i').unwrap_or(stem).to_ascii_uppercase();
        let decimal = if binary == "K" { "k" } else { binary.as_str() };
        if UNITS.iter().any(|(u, _)| *u == decimal) {
            return format!(
                "unknown unit {unit:?}: write {binary}i for {binary}iB (powers of 1024) or \
                 {decimal} for {decimal}B (powers of 1000)"
            );
        }
        if stem.is_empty() {
            return format!("unknown unit {unit:?}: bytes take no unit (67108864)");
        }
    }
    if UNITS.iter().any(|(u, _)| u.eq_ignore_ascii_case(unit)) {
        return format!(
            "unknown unit {unit:?}: units are case-sensitive (Mi, Gi; M, G; a lower-case m is \
             Kubernetes' thousandth)"
        );
    }
    format!("unknown unit {unit:?}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_integers_are_bytes() {
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(parse_size("67108864"), Ok(67_108_864));
        assert_eq!(parse_size(" 4096 "), Ok(4096));
        assert_eq!(parse_size("18446744073709551615"), Ok(u64::MAX));
    }

    #[test]
    fn units_follow_kubernetes() {
        for (text, bytes) in [
            ("64Mi", 64 << 20),
            ("64M", 64_000_000),
            ("1k", 1000),
            ("1K", 1000),
            ("512Ki", 512 << 10),
            ("2Gi", 2 << 30),
            ("2G", 2_000_000_000),
            ("1Ti", 1 << 40),
            ("1T", 1_000_000_000_000),
            ("1Pi", 1 << 50),
            ("1P", 1_000_000_000_000_000),
            ("15Ei", 15 << 60),
            ("18E", 18_000_000_000_000_000_000),
            ("0Gi", 0),
        ] {
            assert_eq!(parse_size(text), Ok(bytes), "{text}");
        }
    }

    #[test]
    fn fractions_take_a_unit_and_round_up_to_a_byte() {
        assert_eq!(parse_size("1.5Gi"), Ok(3 << 29));
        assert_eq!(parse_size("0.5Mi"), Ok(512 << 10));
        assert_eq!(parse_size("1.5M"), Ok(1_500_000));
        assert_eq!(parse_size("2.0k"), Ok(2000));
        // 0.1 Gi is 107374182.4 bytes: the next whole byte.
        assert_eq!(parse_size("0.1Gi"), Ok(107_374_183));
        assert_eq!(parse_size("0.001k"), Ok(1));
        assert_eq!(parse_size("0.0001k"), Ok(1));
        assert_eq!(parse_size("15.99Ei"), Ok(18_435_214_858_663_483_147));
    }

    #[test]
    fn bad_sizes_say_why_and_what_to_write() {
        for (text, why) in [
            ("", "empty"),
            ("   ", "empty"),
            ("-1", "negative"),
            ("-64Mi", "negative"),
            ("Mi", "no number"),
            (".5Mi", "\".5\" is not a number"),
            ("1.Mi", "\"1.\" is not a number"),
            ("1.2.3Mi", "\"1.2.3\" is not a number"),
            ("1.5", "a fraction of a byte"),
            ("64Q", "unknown unit \"Q\""),
            ("64 Mi", "write the unit right after the number"),
            ("64MiB", "write Mi for MiB (powers of 1024) or M for MB"),
            ("64MB", "write Mi for MiB (powers of 1024) or M for MB"),
            ("64kb", "write Ki for KiB (powers of 1024) or k for kB"),
            ("64GiB", "write Gi for GiB"),
            ("64B", "bytes take no unit"),
            ("64mi", "units are case-sensitive"),
            ("64m", "Kubernetes' thousandth"),
            ("64KI", "units are case-sensitive"),
            ("1e9", "unknown unit \"e9\""),
            ("+64Mi", "no number"),
            ("0x10", "unknown unit \"x10\""),
            ("18446744073709551616", "too large"),
            ("16Ei", "too large"),
            ("19E", "too large"),
            ("99999999999999999999999Ki", "too large"),
            ("15.9999999999999999999Ei", "more than 18 decimals"),
        ] {
            let err = parse_size(text).expect_err(text);
            assert!(err.why().contains(why), "{text:?}: {err}");
            assert!(err.to_string().contains("64Mi"), "{text:?}: {err}");
        }
        // Just below 2^64: the sum of the whole and the fraction does not wrap.
        assert_eq!(
            parse_size("15.9999999999999999Ei"),
            Ok(18_446_744_073_709_551_501)
        );
    }

    #[test]
    fn the_clap_parser_shows_the_forms() {
        assert_eq!(parse_size_arg("64Mi"), Ok(64 << 20));
        let e = parse_size_arg("64MB").unwrap_err();
        assert!(e.contains("write Mi for MiB") && e.contains("64Mi"), "{e}");
    }
}
