//! The bucket grid of Prometheus native histograms at the schema EMARS exports instance peaks
//! with: schema 4, each bucket 2^(1/16) ≈ 4.43 % wider than the one below, so a peak lies
//! within 4.4 % under its bucket's upper bound. The exporter (api::metrics) files peaks into
//! these buckets and the fleet view (policy::fleet) reads them back, so both use this one grid.
//!
//! Bucket `i` holds the values v with 2^((i-1)/16) < v <= 2^(i/16) (Prometheus's convention:
//! upper bounds inclusive). Peaks are whole bytes, so zero is the only value below bucket 1.

/// The exported schema: 2^(2^-SCHEMA) is the bucket growth factor.
pub const SCHEMA: i32 = 4;

/// Buckets per doubling.
const PER_DOUBLING: f64 = (1u32 << SCHEMA) as f64;

/// The index of the bucket that holds `bytes` (> 0; zero goes to the zero bucket).
pub fn bucket_index(bytes: u64) -> i32 {
    debug_assert!(bytes > 0);
    let guess = ((bytes.max(1) as f64).log2() * PER_DOUBLING).ceil() as i32;
    // log2 in floating point can land one bucket off at exact powers: settle on the grid.
    if bytes as f64 > upper_bound(guess) {
        guess + 1
    } else if guess > 0 && bytes as f64 <= upper_bound(guess - 1) {
        guess - 1
    } else {
        guess
    }
}

/// The upper bound (inclusive) of bucket `index`, in bytes.
pub fn upper_bound(index: i32) -> f64 {
    (index as f64 / PER_DOUBLING).exp2()
}

/// The upper bound of bucket `index` rounded up to a whole byte: the value a fleet sample in
/// that bucket is taken as (never below the peak it stands for).
pub fn upper_bound_bytes(index: i32) -> u64 {
    upper_bound(index).ceil() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_value_lies_in_its_bucket_within_the_grid_error() {
        for bytes in [
            1u64,
            2,
            3,
            4095,
            4096,
            1 << 20,
            (1 << 20) + 1,
            123_456_789,
            1 << 30,
            (1 << 30) - 1,
            64 << 30,
            u64::MAX >> 12,
        ] {
            let i = bucket_index(bytes);
            assert!(bytes as f64 <= upper_bound(i), "{bytes} above bucket {i}");
            assert!(
                bytes as f64 > upper_bound(i - 1),
                "{bytes} below bucket {i}"
            );
            let up = upper_bound_bytes(i);
            assert!(
                up >= bytes && (up as f64) <= bytes as f64 * 1.0444 + 1.0,
                "{bytes}: {up}"
            );
        }
    }

    #[test]
    fn powers_of_two_are_upper_bounds() {
        assert_eq!(bucket_index(1 << 20), 20 * 16);
        assert_eq!(bucket_index((1 << 20) + 1), 20 * 16 + 1);
        assert_eq!(upper_bound_bytes(20 * 16), 1 << 20);
    }
}
