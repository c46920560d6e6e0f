//! The query strings of the listings, under one rule (each key at most once, nothing
//! unknown, `limit` in 1..=[`MAX_LIMIT`]): pages of the instances listing (`GET
//! /v1/functions/{name}/instances`) with their cursor, and the `limit` (and `function`) of the
//! audit and generations listings ([`parse_listing`]).
//!
//! Records are listed by their key, (started_at_ms, cgroup_id), which never changes for a
//! record: `order=oldest` (the default) ascending, `order=newest` descending. A page holds at
//! most `limit` records (default [`DEFAULT_LIMIT`], at most [`MAX_LIMIT`]); when more follow,
//! the answer's `next` is the cursor to ask for them with (`cursor=`). A cursor is the key of
//! the page's last record, and the next page starts strictly beyond it, so that paging neither
//! repeats nor skips a record while instances start (new ones sort last) and end (their key
//! stays). It is opaque to clients: 32 lowercase hex digits.

use crate::model::live::{InstanceKey, Order};
use crate::model::registry::valid_function_name;
use crate::store::PageQuery;

use super::ApiError;

/// Records per page when `limit` is not given.
pub const DEFAULT_LIMIT: usize = 1_000;
/// The largest `limit`.
pub const MAX_LIMIT: usize = 10_000;
/// What a cursor looks like (the OpenAPI document says the same).
pub const CURSOR_PATTERN: &str = "^[0-9a-f]{32}$";

/// The cursor of the page after the one ending with `key`.
pub fn encode_cursor(key: InstanceKey) -> String {
    format!("{:016x}{:016x}", key.0, key.1)
}

/// The key a cursor names; None when it is not one ([`CURSOR_PATTERN`]).
pub fn decode_cursor(cursor: &str) -> Option<InstanceKey> {
    let lower_hex = |s: &str| s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    if cursor.len() != 32 || !lower_hex(cursor) {
        return None;
    }
    let (started, cgroup) = cursor.split_at(16);
    Some((
        u64::from_str_radix(started, 16).ok()?,
        u64::from_str_radix(cgroup, 16).ok()?,
    ))
}

/// `limit` of the audit and generations listings when none is given.
pub const DEFAULT_LISTING_LIMIT: usize = 100;

/// Calls `each` on every pair of a query string in order, refusing a key given twice (400)
/// before its pair is looked at: the one rule of every route's query string.
fn each_once(
    pairs: &[(String, String)],
    mut each: impl FnMut(&str, &str) -> Result<(), ApiError>,
) -> Result<(), ApiError> {
    let mut seen: Vec<&str> = Vec::new();
    for (key, value) in pairs {
        if seen.contains(&key.as_str()) {
            return Err(ApiError::bad_request(format!(
                "query parameter `{key}` given twice"
            )));
        }
        each(key, value)?;
        seen.push(key);
    }
    Ok(())
}

/// A parameter's value that is not what it must be.
fn bad_value(key: &str, value: &str, expected: &str) -> ApiError {
    ApiError::bad_request(format!(
        "query parameter `{key}` must be {expected}, got {value:?}"
    ))
}

/// `limit=N`: 1..=[`MAX_LIMIT`].
fn parse_limit(key: &str, value: &str) -> Result<usize, ApiError> {
    value
        .parse::<usize>()
        .ok()
        .filter(|n| (1..=MAX_LIMIT).contains(n))
        .ok_or_else(|| bad_value(key, value, &format!("an integer in 1..={MAX_LIMIT}")))
}

/// `?live=…&limit=…&order=…&cursor=…`, each at most once, nothing else.
pub fn parse_query(pairs: &[(String, String)]) -> Result<PageQuery, ApiError> {
    let mut q = PageQuery {
        limit: DEFAULT_LIMIT,
        ..PageQuery::default()
    };
    each_once(pairs, |key, value| {
        let bad = |expected: &str| bad_value(key, value, expected);
        match key {
            "live" => {
                q.live = Some(match value {
                    "true" => true,
                    "false" => false,
                    _ => return Err(bad("true or false")),
                })
            }
            "limit" => q.limit = parse_limit(key, value)?,
            "order" => {
                q.order = match value {
                    "oldest" => Order::Oldest,
                    "newest" => Order::Newest,
                    _ => return Err(bad("oldest or newest")),
                }
            }
            "cursor" => {
                q.after = Some(decode_cursor(value).ok_or_else(|| {
                    bad("the `next` of an earlier answer (32 lowercase hex digits)")
                })?)
            }
            other => {
                return Err(ApiError::bad_request(format!(
                    "unknown query parameter {other:?} (expected `live`, `limit`, `order` or \
                     `cursor`)"
                )))
            }
        }
        Ok(())
    })?;
    Ok(q)
}

/// `?input_bytes=N` of `GET /v1/functions/{name}/limits` (a whole number of bytes), at most
/// once, nothing else; None when not given.
pub fn parse_input_bytes(pairs: &[(String, String)]) -> Result<Option<u64>, ApiError> {
    let mut input = None;
    each_once(pairs, |key, value| {
        match key {
            "input_bytes" => {
                let max = super::wire::MAX_INPUT_BYTES;
                input = Some(
                    value
                        .parse::<u64>()
                        .ok()
                        .filter(|n| *n <= max)
                        .ok_or_else(|| {
                            bad_value(
                                key,
                                value,
                                &format!("a whole number of bytes from 0 to {max}"),
                            )
                        })?,
                )
            }
            other => {
                return Err(ApiError::bad_request(format!(
                    "unknown query parameter {other:?} (expected `input_bytes`)"
                )))
            }
        }
        Ok(())
    })?;
    Ok(input)
}

/// What the audit and generations listings were asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listing {
    /// At most this many, newest first.
    pub limit: usize,
    /// Only this function's (generations only).
    pub function: Option<String>,
}

/// `?limit=N` (1..=[`MAX_LIMIT`], default [`DEFAULT_LISTING_LIMIT`]) and, where
/// `allow_function`, `?function=NAME`: each at most once, nothing else.
pub fn parse_listing(
    pairs: &[(String, String)],
    allow_function: bool,
) -> Result<Listing, ApiError> {
    let mut listing = Listing {
        limit: DEFAULT_LISTING_LIMIT,
        function: None,
    };
    each_once(pairs, |key, value| {
        match key {
            "limit" => listing.limit = parse_limit(key, value)?,
            "function" if allow_function => {
                if !valid_function_name(value) {
                    return Err(ApiError::bad_request(format!(
                        "invalid function name {value:?}"
                    )));
                }
                listing.function = Some(value.to_owned());
            }
            other => {
                return Err(ApiError::bad_request(format!(
                    "unknown query parameter {other:?}"
                )))
            }
        }
        Ok(())
    })?;
    Ok(listing)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(v: &[(&str, &str)]) -> Result<PageQuery, String> {
        let pairs: Vec<(String, String)> = v
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
        parse_query(&pairs).map_err(|e| e.message)
    }

    #[test]
    fn cursors_round_trip_and_keep_the_key_order() {
        let pattern = regex::Regex::new(CURSOR_PATTERN).unwrap();
        for key in [
            (0, 0),
            (1_700_000_000_000, 42),
            (u64::MAX, u64::MAX),
            (7, u64::MAX),
        ] {
            let c = encode_cursor(key);
            assert_eq!(c.len(), 32);
            assert!(pattern.is_match(&c), "{c}");
            assert_eq!(decode_cursor(&c), Some(key));
        }
        // Cursors sort as their keys do.
        let (a, b) = (encode_cursor((5, u64::MAX)), encode_cursor((6, 0)));
        assert!(a < b);
    }

    #[test]
    fn bad_cursors_are_refused() {
        let good = encode_cursor((1, 2));
        for bad in [
            "",
            "00",
            &good[1..],
            &format!("{good}0"),
            &good.to_uppercase().replace('0', "A"),
            "0000000000000000000000000000000g",
            "+000000000000000000000000000000f",
            "-000000000000000000000000000000f",
            " 000000000000000000000000000000f",
        ] {
            assert_eq!(decode_cursor(bad), None, "{bad:?}");
        }
        let e = parse(&[("cursor", "xyz")]).unwrap_err();
        assert!(e.contains("`cursor`") && e.contains("\"xyz\""), "{e}");
    }

    #[test]
    fn query() {
        assert_eq!(
            parse(&[]).unwrap(),
            PageQuery {
                live: None,
                order: Order::Oldest,
                after: None,
                limit: DEFAULT_LIMIT
            }
        );
        let c = encode_cursor((10, 3));
        assert_eq!(
            parse(&[
                ("live", "true"),
                ("limit", "5"),
                ("order", "newest"),
                ("cursor", &c)
            ])
            .unwrap(),
            PageQuery {
                live: Some(true),
                order: Order::Newest,
                after: Some((10, 3)),
                limit: 5
            }
        );
        assert_eq!(parse(&[("limit", "10000")]).unwrap().limit, MAX_LIMIT);
        for (k, v, needle) in [
            ("limit", "0", "\"0\""),
            ("limit", "10001", "10001"),
            ("limit", "-1", "\"-1\""),
            ("limit", "", "1..=10000"),
            ("live", "yes", "\"yes\""),
            ("order", "oldest-first", "oldest or newest"),
            ("lve", "true", "\"lve\""),
        ] {
            let e = parse(&[(k, v)]).unwrap_err();
            assert!(e.contains(needle), "{k}={v}: {e}");
        }
        let e = parse(&[("order", "newest"), ("order", "oldest")]).unwrap_err();
        assert!(e.contains("twice"), "{e}");
    }

    fn listing(v: &[(&str, &str)], allow_function: bool) -> Result<Listing, String> {
        let pairs: Vec<(String, String)> = v
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
        parse_listing(&pairs, allow_function).map_err(|e| e.message)
    }

    #[test]
    fn listings_take_limit_and_function_once() {
        assert_eq!(
            listing(&[], true).unwrap(),
            Listing {
                limit: DEFAULT_LISTING_LIMIT,
                function: None
            }
        );
        assert_eq!(
            listing(&[("limit", "10000"), ("function", "fn-a")], true).unwrap(),
            Listing {
                limit: MAX_LIMIT,
                function: Some("fn-a".into())
            }
        );
        for (pairs, allow, needle) in [
            (
                &[("limit", "0")][..],
                false,
                "must be an integer in 1..=10000, got \"0\"",
            ),
            (&[("limit", "10001")][..], false, "10001"),
            (
                &[("function", "fn-a")][..],
                false,
                "unknown query parameter \"function\"",
            ),
            (
                &[("function", "a b")][..],
                true,
                "invalid function name \"a b\"",
            ),
            (
                &[("lmit", "1")][..],
                true,
                "unknown query parameter \"lmit\"",
            ),
            (
                &[("limit", "1"), ("limit", "2")][..],
                false,
                "`limit` given twice",
            ),
            (
                &[("function", "a"), ("function", "b")][..],
                true,
                "`function` given twice",
            ),
        ] {
            let e = listing(pairs, allow).unwrap_err();
            assert!(e.contains(needle), "{pairs:?}: {e}");
        }
    }
}
