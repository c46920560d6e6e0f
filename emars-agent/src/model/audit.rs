//! The audit log's record of one limit write ([`AuditRecord`]), and the closed sets its
//! fields take ([`Outcome`], [`Reason`], [`ClampedBy`]). Here, below the store that keeps
//! these records and the policy that writes them. In JSON each enum is its string
//! (`"ok"`, `"new_instance"`, `"runtime_limit"`): a value this version does not know (a
//! record of an older one, which could hold an error text as its outcome) decodes as `Other`
//! and encodes back unchanged.

use serde::{Deserialize, Serialize};

use crate::model::{InstanceRecord, Limits};

/// An enum kept as a string in JSON: `$text` per variant, and `Other(String)` for any other.
macro_rules! string_enum {
    ($(#[$doc:meta])* $name:ident { $($(#[$vdoc:meta])* $variant:ident = $text:literal,)+ }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vdoc])* $variant,)+
            /// A value this version does not know (kept as it was read).
            Other(String),
        }

        impl $name {
            pub fn as_str(&self) -> &str {
                match self {
                    $(Self::$variant => $text,)+
                    Self::Other(text) => text,
                }
            }
        }

        impl From<&str> for $name {
            fn from(text: &str) -> Self {
                match text {
                    $($text => Self::$variant,)+
                    other => Self::Other(other.to_owned()),
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.pad(self.as_str())
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                self.as_str() == other
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.as_str() == *other
            }
        }

        impl Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(self.as_str())
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let text = std::borrow::Cow::<'de, str>::deserialize(deserializer)?;
                Ok(Self::from(text.as_ref()))
            }
        }
    };
}

string_enum! {
    /// What became of a write ([`AuditRecord::outcome`]).
    Outcome {
        /// Intent recorded, outcome not yet: the write is under way.
        Pending = "pending",
        /// Every requested file was written.
        Ok = "ok",
        /// Some files were written (see `written`), then a write failed (see `error`).
        Partial = "partial",
        /// Nothing was written: the write failed.
        Failed = "failed",
        /// Nothing was written: a safety rule refused it.
        Refused = "refused",
        /// The agent stopped between intent and outcome; `written` holds what a restarted
        /// agent found in the limit files.
        Interrupted = "interrupted",
        /// The limits asked for were in force already: nothing was written (and nothing is
        /// kept in the audit log; counted as `unchanged` in GET /v1/info).
        Unchanged = "unchanged",
    }
}

string_enum! {
    /// Who asked for a write ([`AuditRecord::reason`]).
    Reason {
        /// The recommendation written into a new instance at its mkdir.
        NewInstance = "new_instance",
        /// One-shot enforcement of every live instance (`POST /v1/apply`).
        Apply = "apply",
        /// An operator, by hand (`POST .../limits`, `emars set-limit`).
        Api = "api",
        /// A platform bound a pooled cgroup to a function (a watermark reset, no limit).
        Bind = "bind",
        /// Limits at a bind with a size hint, from the function's fit of peak against input.
        InputFit = "input_fit",
        /// Limits at a bind with a size hint, from the function's recommendation: the fit
        /// could not answer for that input (too few samples, inputs alike, too scattered, or
        /// the input far outside those seen).
        InputFallback = "input_fallback",
        /// The burst guard armed an instance's limits.
        BurstArm = "burst_arm",
        /// The burst guard raised a limit under a burst.
        Burst = "burst",
        /// The squeeze held or reclaimed under memory pressure.
        Pressure = "pressure",
        /// The squeeze released a hold.
        Release = "release",
    }
}

string_enum! {
    /// What bounded a limit below what the rule or the request asked for.
    ClampedBy {
        /// The recommendation's floor (`policy.min_bytes`).
        Floor = "floor",
        /// The recommendation's ceiling (`policy.max_bytes`).
        Ceiling = "ceiling",
        /// Host memory.
        HostMemory = "host_memory",
        /// The limit the container's runtime gave the instance
        /// (`policy.override_runtime_limits` lifts it).
        RuntimeLimit = "runtime_limit",
    }
}

/// One write attempt, as kept in the audit log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AuditRecord {
    pub at_ms: u64,
    pub function: String,
    pub instance: String,
    pub cgroup_path: String,
    #[serde(default)]
    pub cgroup_id: u64,
    /// Who asked: "new_instance", "apply", "api", "bind", "input_fit", "input_fallback",
    /// "burst_arm", "burst", "pressure" or "release".
    #[schema(value_type = String)]
    pub reason: Reason,
    pub old: Limits,
    /// What was (or would have been) written.
    pub new: Limits,
    /// What reached the kernel: a file left out here was not written.
    #[serde(default)]
    pub written: Limits,
    pub usage_bytes: Option<u64>,
    /// Microseconds from the kernel's mkdir event to the completed write (new instances).
    pub delay_us: Option<u64>,
    /// True when the request was raised to usage + headroom.
    pub raised: bool,
    /// One of [`Outcome`]'s values (records of older versions may hold an error text).
    #[schema(value_type = String)]
    pub outcome: Outcome,
    /// Why the write failed or was refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The kernel signal that caused a reactive action ("psi some 100000us/1000000us on
    /// /proc/pressure/memory", "memory.events").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<String>,
    /// What bounded the write below what was asked: "runtime_limit" (the limit the container's
    /// runtime gave it; `policy.override_runtime_limits` lifts it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub clamped_by: Option<ClampedBy>,
    /// What was asked, when `clamped_by` says the write was bounded below it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requested: Option<Limits>,
    /// A reclaim (reason "pressure"): bytes asked for, and what usage fell by.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reclaim_requested_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reclaimed_bytes: Option<u64>,
}

impl AuditRecord {
    /// The limits asked for are in force: written, or there already.
    pub fn is_ok(&self) -> bool {
        matches!(self.outcome, Outcome::Ok | Outcome::Unchanged)
    }

    /// The intent of a write into `inst` (outcome pending, nothing written yet), new limits
    /// as old until the write says otherwise.
    pub fn intent(inst: &InstanceRecord, reason: Reason, signal: Option<&str>) -> Self {
        AuditRecord {
            at_ms: crate::clock::now_ms(),
            function: inst.function.clone(),
            instance: inst.instance.clone(),
            cgroup_path: inst.cgroup_path.clone(),
            cgroup_id: inst.cgroup_id,
            reason,
            old: inst.limits,
            new: inst.limits,
            written: Limits::default(),
            usage_bytes: None,
            delay_us: None,
            raised: false,
            outcome: Outcome::Pending,
            error: None,
            signal: signal.map(str::to_owned),
            clamped_by: None,
            requested: None,
            reclaim_requested_bytes: None,
            reclaimed_bytes: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enums_are_their_strings_in_json_and_keep_unknown_values() {
        assert_eq!(serde_json::to_string(&Outcome::Ok).unwrap(), "\"ok\"");
        assert_eq!(
            serde_json::to_string(&Reason::NewInstance).unwrap(),
            "\"new_instance\""
        );
        assert_eq!(
            serde_json::to_string(&ClampedBy::HostMemory).unwrap(),
            "\"host_memory\""
        );
        let old: Outcome = serde_json::from_str("\"EBUSY writing memory.max\"").unwrap();
        assert_eq!(old, Outcome::Other("EBUSY writing memory.max".to_owned()));
        assert_eq!(
            serde_json::to_string(&old).unwrap(),
            "\"EBUSY writing memory.max\""
        );
        assert_eq!(
            serde_json::from_str::<Reason>("\"burst_arm\"").unwrap(),
            Reason::BurstArm
        );
        assert_eq!(Reason::from("release"), "release");
    }

    #[test]
    fn a_record_of_an_older_version_decodes() {
        let json = r#"{"at_ms":1,"function":"f","instance":"i","cgroup_path":"/x",
            "reason":"set_limit","old":{"max_bytes":null,"high_bytes":null},
            "new":{"max_bytes":1,"high_bytes":null},"usage_bytes":null,"delay_us":null,
            "raised":false,"outcome":"cgroup gone"}"#;
        let rec: AuditRecord = serde_json::from_str(json).unwrap();
        assert_eq!(rec.reason, Reason::Other("set_limit".to_owned()));
        assert_eq!(rec.outcome, Outcome::Other("cgroup gone".to_owned()));
        assert_eq!(rec.clamped_by, None);
        let back: serde_json::Value = serde_json::to_value(&rec).unwrap();
        assert_eq!(back["outcome"], "cgroup gone");
        assert_eq!(back["reason"], "set_limit");
    }
}
