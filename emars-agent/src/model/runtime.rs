//! A container's labels, read from the files its OCI runtime keeps: what names the function
//! when the cgroup path does not (Docker's `/docker/<id>`, Kubernetes' pod and container ids).
//!
//! Read once per new container, when a rule with `metadata` matches its cgroup (see
//! docs/config.md). Three layouts are understood, and whatever a file holds of them is merged:
//! - runc's `state.json` (`/run/runc/<id>/state.json`; Docker's
//!   `/run/docker/runtime-runc/moby/<id>/state.json`; containerd's
//!   `/run/containerd/runc/<namespace>/<id>/state.json`): `config.labels`, a list of `key=value`
//!   into which runc copies the bundle's annotations and adds `bundle=<dir>`;
//! - an OCI bundle's `config.json`, or the OCI state (`annotations`), which crun keeps as
//!   `/run/crun/<id>/config.json`;
//! - Docker's `config.v2.json` (`/var/lib/docker/containers/<id>/config.v2.json`):
//!   `Config.Labels`.
//!
//! The same files say which memory limit the runtime gave the container (`docker run
//! --memory`): runc's state.json `config.cgroups.memory` (libcontainer's resources, written
//! into memory.max / memory.limit_in_bytes before runc writes the file), an OCI bundle's
//! `linux.resources.memory.limit`. The agent writes no limit above it (see `policy::actuator`).

//!
//! The files are read by `kernel::runtime_meta`; this module says what their bytes mean.

use std::{collections::BTreeMap, path::Path};

use crate::kernel::runtime_meta::{self, FileRead};

/// A container's labels and annotations, by key.
pub type Labels = BTreeMap<String, String>;

/// What reading a container's metadata file gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetadataRead {
    Labels(Labels),
    /// Not there (yet: runc writes its state after it creates the cgroup).
    Absent,
    /// There but unusable: not a regular file, too large, not JSON. Said, and treated as
    /// absent for good.
    Unusable(String),
}

/// A container's metadata file as the rules read it: its labels, and the memory limit the
/// runtime gave the container (None: none, or the file does not say).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerMetadata {
    pub read: MetadataRead,
    pub memory_limit_bytes: Option<u64>,
}

impl From<MetadataRead> for ContainerMetadata {
    fn from(read: MetadataRead) -> Self {
        ContainerMetadata {
            read,
            memory_limit_bytes: None,
        }
    }
}

/// Reads the labels in `path` (see [`read_metadata`]).
pub fn read_labels(path: &Path) -> MetadataRead {
    read_metadata(path).read
}

/// The labels and the runtime's memory limit in the metadata file `path`: the file read by
/// `kernel::runtime_meta` (no FIFO, nothing but a regular file), its bytes parsed here.
pub fn read_metadata(path: &Path) -> ContainerMetadata {
    metadata_of(runtime_meta::read(path), path)
}

/// What a metadata file's read means: its labels and the runtime's memory limit, or why not.
pub fn metadata_of(read: FileRead, path: &Path) -> ContainerMetadata {
    let text = match read {
        FileRead::Bytes(text) => text,
        FileRead::Absent => return MetadataRead::Absent.into(),
        FileRead::Unusable(why) => return MetadataRead::Unusable(why).into(),
    };
    match parse_metadata(&text) {
        Ok((labels, memory_limit_bytes)) => ContainerMetadata {
            read: MetadataRead::Labels(labels),
            memory_limit_bytes,
        },
        Err(e) => MetadataRead::Unusable(format!("{}: {e}", path.display())).into(),
    }
}

/// The labels of one metadata document, from whichever of the known layouts it has. Later
/// layouts do not overwrite a key an earlier one gave.
pub fn parse_labels(text: &[u8]) -> Result<Labels, String> {
    parse_metadata(text).map(|(labels, _)| labels)
}

/// The labels and the runtime's memory limit of one metadata document.
pub fn parse_metadata(text: &[u8]) -> Result<(Labels, Option<u64>), String> {
    let doc: serde_json::Value =
        serde_json::from_slice(text).map_err(|e| format!("not JSON: {e}"))?;
    Ok((labels_of(&doc), memory_limit_of(&doc)))
}

/// The memory limit a runtime's document gives the container: runc's state.json
/// `config.cgroups.memory` (0: none), an OCI config's `linux.resources.memory.limit` (-1 or
/// absent: none).
fn memory_limit_of(doc: &serde_json::Value) -> Option<u64> {
    ["/config/cgroups/memory", "/linux/resources/memory/limit"]
        .iter()
        .filter_map(|p| doc.pointer(p).and_then(serde_json::Value::as_i64))
        .filter_map(|v| u64::try_from(v).ok().filter(|v| *v > 0))
        .min()
}

fn labels_of(doc: &serde_json::Value) -> Labels {
    let mut labels = Labels::new();
    // runc: config.labels = ["key=value", ...].
    if let Some(list) = doc
        .pointer("/config/labels")
        .and_then(serde_json::Value::as_array)
    {
        for item in list.iter().filter_map(serde_json::Value::as_str) {
            if let Some((k, v)) = item.split_once('=') {
                labels.entry(k.to_owned()).or_insert_with(|| v.to_owned());
            }
        }
    }
    // OCI config.json and state: annotations = {key: value}; Docker: Config.Labels.
    for pointer in ["/annotations", "/Config/Labels"] {
        if let Some(map) = doc.pointer(pointer).and_then(serde_json::Value::as_object) {
            for (k, v) in map {
                if let Some(v) = v.as_str() {
                    labels.entry(k.clone()).or_insert_with(|| v.to_owned());
                }
            }
        }
    }
    labels
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_runc_state_oci_annotations_and_docker_labels() {
        let runc = br#"{"id":"c1","config":{"labels":["io.kubernetes.container.name=resize",
            "bundle=/run/b/c1","odd","k=v=w"]}}"#;
        let l = parse_labels(runc).unwrap();
        assert_eq!(l["io.kubernetes.container.name"], "resize");
        assert_eq!(l["bundle"], "/run/b/c1");
        assert_eq!(l["k"], "v=w");
        assert!(!l.contains_key("odd"));

        let oci = br#"{"ociVersion":"1.0.2","annotations":{"fn":"thumbnail","n":3}}"#;
        let l = parse_labels(oci).unwrap();
        assert_eq!(l["fn"], "thumbnail");
        assert!(!l.contains_key("n"), "only string values are labels");

        let docker = br#"{"Name":"/web","Config":{"Labels":{"com.example.fn":"web"}}}"#;
        assert_eq!(parse_labels(docker).unwrap()["com.example.fn"], "web");

        assert!(parse_labels(b"{not json").is_err());
        assert_eq!(parse_labels(b"[]").unwrap(), Labels::new());
    }

    #[test]
    fn reads_the_runtime_memory_limit() {
        // runc 1.1's state.json: libcontainer's resources inside config.cgroups.
        let runc = br#"{"config":{"cgroups":{"path":"/x","memory":67108864,"memory_swap":0},
            "labels":["fn=a"]}}"#;
        assert_eq!(parse_metadata(runc).unwrap().1, Some(64 << 20));
        let unset = br#"{"config":{"cgroups":{"memory":0}}}"#;
        assert_eq!(parse_metadata(unset).unwrap().1, None);
        // An OCI bundle's config.json (crun's state too).
        let oci = br#"{"ociVersion":"1.0.2","linux":{"resources":{"memory":{"limit":134217728}}}}"#;
        assert_eq!(parse_metadata(oci).unwrap().1, Some(128 << 20));
        let unlimited = br#"{"linux":{"resources":{"memory":{"limit":-1}}}}"#;
        assert_eq!(parse_metadata(unlimited).unwrap().1, None);
        let docker = br#"{"Config":{"Labels":{"fn":"web"}}}"#;
        assert_eq!(
            parse_metadata(docker).unwrap(),
            (parse_labels(docker).unwrap(), None)
        );
    }

    #[test]
    fn absent_fifo_and_directory_are_told_apart() {
        let dir = std::env::temp_dir().join(format!("emars-runtime-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        assert_eq!(read_labels(&dir.join("none.json")), MetadataRead::Absent);
        assert!(matches!(read_labels(&dir), MetadataRead::Unusable(e) if e.contains("regular")));
        let fifo = dir.join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        // Would block forever without O_NONBLOCK (no writer).
        assert!(matches!(read_labels(&fifo), MetadataRead::Unusable(e) if e.contains("regular")));
        let state = dir.join("state.json");
        std::fs::write(&state, br#"{"config":{"labels":["fn=a"]}}"#).unwrap();
        let MetadataRead::Labels(l) = read_labels(&state) else {
            panic!("labels expected")
        };
        assert_eq!(l["fn"], "a");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
