//! The rule for a name a path rule (or the API) gives: a function name is 1 to
//! [`MAX_FUNCTION_NAME_LEN`] bytes of `[A-Za-z0-9._:-]` (a store key, URL segment and file
//! name without escaping), an instance name 1 to [`MAX_INSTANCE_NAME_LEN`] characters, none a
//! control character; and why a name is refused ([`Unnamed`]). The API checks what it is sent
//! against the same functions, and its document states [`FUNCTION_NAME_PATTERN`].

/// Longest function name; it ends up in API URLs and store keys.
pub const MAX_FUNCTION_NAME_LEN: usize = 128;
/// [`valid_function_name`] as a regular expression: what the API's document states for every
/// function name it takes (a test holds the two equal).
pub const FUNCTION_NAME_PATTERN: &str = "^[A-Za-z0-9._:-]{1,128}$";
/// [`valid_function_name`] in words, for the messages that refuse a name.
pub const FUNCTION_NAME_RULE: &str = "1 to 128 characters of A-Z a-z 0-9 . _ : -";
/// Longest instance name, in characters (a cgroup directory name is at most 255 bytes, so at
/// most as many characters).
pub const MAX_INSTANCE_NAME_LEN: usize = 255;

/// Why a name a rule gave cannot be used. Names are store keys, URL segments and file names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Unnamed {
    /// The function name is empty (a capture that matched nothing).
    FunctionEmpty,
    /// Longer than [`MAX_FUNCTION_NAME_LEN`] bytes.
    FunctionTooLong,
    /// A character outside `[A-Za-z0-9._:-]` (a space, non-ASCII, `$`, `<`...).
    FunctionCharacters,
    InstanceEmpty,
    /// Longer than [`MAX_INSTANCE_NAME_LEN`] characters.
    InstanceTooLong,
    /// A control character.
    InstanceCharacters,
}

impl Unnamed {
    /// Every reason, in the order reports list them.
    pub const ALL: [Unnamed; 6] = [
        Unnamed::FunctionEmpty,
        Unnamed::FunctionTooLong,
        Unnamed::FunctionCharacters,
        Unnamed::InstanceEmpty,
        Unnamed::InstanceTooLong,
        Unnamed::InstanceCharacters,
    ];

    /// The label of /v1/info and /metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Unnamed::FunctionEmpty => "function_empty",
            Unnamed::FunctionTooLong => "function_too_long",
            Unnamed::FunctionCharacters => "function_characters",
            Unnamed::InstanceEmpty => "instance_empty",
            Unnamed::InstanceTooLong => "instance_too_long",
            Unnamed::InstanceCharacters => "instance_characters",
        }
    }

    /// What a valid name is, for the log line an operator reads.
    pub fn rule(self) -> String {
        match self {
            Unnamed::FunctionEmpty | Unnamed::FunctionCharacters | Unnamed::FunctionTooLong => {
                format!("a function name is {FUNCTION_NAME_RULE}")
            }
            Unnamed::InstanceEmpty | Unnamed::InstanceTooLong | Unnamed::InstanceCharacters => {
                format!(
                    "an instance name is 1 to {MAX_INSTANCE_NAME_LEN} characters, none a \
                     control character"
                )
            }
        }
    }

    /// Why `function` and `instance` cannot be used, if they cannot; the function first.
    pub fn check(function: &str, instance: &str) -> Option<Unnamed> {
        Self::of_function(function).or_else(|| Self::of_instance(instance))
    }

    /// Why a function name cannot be used: 1 to [`MAX_FUNCTION_NAME_LEN`] bytes of
    /// `[A-Za-z0-9._:-]`.
    fn of_function(name: &str) -> Option<Unnamed> {
        if name.is_empty() {
            Some(Unnamed::FunctionEmpty)
        } else if name.len() > MAX_FUNCTION_NAME_LEN {
            Some(Unnamed::FunctionTooLong)
        } else if !name.bytes().all(is_function_byte) {
            Some(Unnamed::FunctionCharacters)
        } else {
            None
        }
    }

    /// Why an instance name cannot be used: 1 to [`MAX_INSTANCE_NAME_LEN`] characters, none a
    /// control character.
    fn of_instance(name: &str) -> Option<Unnamed> {
        if name.is_empty() {
            Some(Unnamed::InstanceEmpty)
        } else if name.chars().count() > MAX_INSTANCE_NAME_LEN {
            Some(Unnamed::InstanceTooLong)
        } else if name.chars().any(char::is_control) {
            Some(Unnamed::InstanceCharacters)
        } else {
            None
        }
    }
}

/// True for 1..=128 characters of `[A-Za-z0-9._:-]`: safe in URLs, file names and store keys
/// without escaping. The API applies the same rule to names it is sent.
pub fn valid_function_name(name: &str) -> bool {
    Unnamed::of_function(name).is_none()
}

pub(super) fn is_function_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-')
}

/// Instances are opaque labels; they only need to be printable and bounded: 1 to
/// [`MAX_INSTANCE_NAME_LEN`] characters (as JSON Schema's `maxLength` counts them, so that
/// the API document can state the rule), none a control character.
pub fn valid_instance_name(name: &str) -> bool {
    Unnamed::of_instance(name).is_none()
}

#[cfg(test)]
mod tests {
    use super::*;
    use regex::Regex;

    #[test]
    fn valid_function_names() {
        for ok in ["a", "hello_world", "A.b:c-d_9", &"x".repeat(128)] {
            assert!(valid_function_name(ok), "{ok:?}");
        }
        for bad in ["", "a b", "a/b", "é", "a\n", "a{b}", "a*", &"x".repeat(129)] {
            assert!(!valid_function_name(bad), "{bad:?}");
        }
    }

    /// The pattern and the words say what [`valid_function_name`] checks.
    #[test]
    fn the_function_name_pattern_is_the_rule() {
        let bound = format!("{{1,{MAX_FUNCTION_NAME_LEN}}}");
        assert!(FUNCTION_NAME_PATTERN.contains(&bound));
        assert!(FUNCTION_NAME_RULE.contains(&format!("1 to {MAX_FUNCTION_NAME_LEN} ")));
        let pattern = Regex::new(FUNCTION_NAME_PATTERN).unwrap();
        let long = [
            "x".repeat(MAX_FUNCTION_NAME_LEN),
            "x".repeat(MAX_FUNCTION_NAME_LEN + 1),
        ];
        let samples = [
            "",
            "a",
            ".",
            "fn:v1.2_x-y",
            "a/b",
            "a b",
            "é",
            "a\n",
            "a$",
            "\u{1f600}",
        ];
        for s in samples
            .iter()
            .copied()
            .chain(long.iter().map(String::as_str))
        {
            assert_eq!(pattern.is_match(s), valid_function_name(s), "{s:?}");
        }
        for b in 0..=u8::MAX {
            let s = [b];
            if let Ok(s) = std::str::from_utf8(&s) {
                assert_eq!(pattern.is_match(s), valid_function_name(s), "{s:?}");
            }
        }
    }
}
