//! Tracepoint formats from tracefs: field offsets are read from the running kernel at start-up,
//! never baked in, so one binary serves every kernel version.

use std::{
    collections::HashMap,
    fs, io,
    path::{Path, PathBuf},
};

#[derive(Debug, thiserror::Error)]
pub enum TracefsError {
    #[error("tracefs is not mounted and mounting it at {path} failed: {source}")]
    Mount { path: PathBuf, source: io::Error },
    #[error("tracepoint {category}:{name} does not exist on this kernel ({path})")]
    Missing {
        category: String,
        name: String,
        path: PathBuf,
    },
    #[error("reading {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("tracepoint {tracepoint} has no field {field:?}")]
    NoField { tracepoint: String, field: String },
}

/// A mounted tracefs.
#[derive(Debug, Clone)]
pub struct Tracefs {
    root: PathBuf,
}

impl Tracefs {
    /// Finds tracefs in /proc/self/mounts, mounting it at /sys/kernel/tracing when absent.
    pub fn find_or_mount() -> Result<Self, TracefsError> {
        if let Ok(mounts) = fs::read_to_string("/proc/self/mounts") {
            for line in mounts.lines() {
                let mut f = line.split_whitespace();
                let (_, Some(dir), Some(fstype)) = (f.next(), f.next(), f.next()) else {
                    continue;
                };
                if fstype == "tracefs" {
                    return Ok(Self { root: dir.into() });
                }
            }
        }
        let root = PathBuf::from("/sys/kernel/tracing");
        mount_tracefs(&root).map_err(|source| TracefsError::Mount {
            path: root.clone(),
            source,
        })?;
        Ok(Self { root })
    }

    pub fn at(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn exists(&self, category: &str, name: &str) -> bool {
        self.format_path(category, name).exists()
    }

    fn format_path(&self, category: &str, name: &str) -> PathBuf {
        self.root
            .join("events")
            .join(category)
            .join(name)
            .join("format")
    }

    pub fn format(&self, category: &str, name: &str) -> Result<Format, TracefsError> {
        let path = self.format_path(category, name);
        let text = fs::read_to_string(&path).map_err(|source| {
            if source.kind() == io::ErrorKind::NotFound {
                TracefsError::Missing {
                    category: category.into(),
                    name: name.into(),
                    path: path.clone(),
                }
            } else {
                TracefsError::Io {
                    path: path.clone(),
                    source,
                }
            }
        })?;
        Ok(Format::parse(&format!("{category}:{name}"), &text))
    }
}

fn mount_tracefs(path: &Path) -> io::Result<()> {
    let c = |s: &str| std::ffi::CString::new(s).map_err(io::Error::other);
    let target = c(path
        .to_str()
        .ok_or_else(|| io::Error::other("non-UTF-8 path"))?)?;
    let fstype = c("tracefs")?;
    // SAFETY: plain mount(2) with valid NUL-terminated strings and no data.
    let rc = unsafe {
        libc::mount(
            fstype.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// A field of a tracepoint record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Field {
    pub offset: u32,
    pub size: u32,
}

/// The parsed `format` file of one tracepoint.
#[derive(Debug, Clone)]
pub struct Format {
    pub tracepoint: String,
    fields: HashMap<String, Field>,
}

impl Format {
    /// Parses lines like `field:__data_loc char[] path; offset:24; size:4; signed:0;` (tab-separated).
    pub fn parse(tracepoint: &str, text: &str) -> Self {
        let mut fields = HashMap::new();
        for line in text.lines() {
            let line = line.trim();
            let Some(rest) = line.strip_prefix("field:") else {
                continue;
            };
            let mut decl = None;
            let mut offset = None;
            let mut size = None;
            for part in rest.split(';').map(str::trim) {
                if let Some(v) = part.strip_prefix("offset:") {
                    offset = v.parse().ok();
                } else if let Some(v) = part.strip_prefix("size:") {
                    size = v.parse().ok();
                } else if decl.is_none() && !part.is_empty() {
                    decl = Some(part);
                }
            }
            let (Some(decl), Some(offset), Some(size)) = (decl, offset, size) else {
                continue;
            };
            // The name is the last word of the declaration, minus any array suffix.
            let name = decl
                .rsplit(|c: char| c.is_whitespace() || c == '*')
                .next()
                .unwrap_or(decl);
            let name = name.split('[').next().unwrap_or(name);
            fields.insert(name.to_owned(), Field { offset, size });
        }
        Self {
            tracepoint: tracepoint.to_owned(),
            fields,
        }
    }

    pub fn field(&self, name: &str) -> Result<Field, TracefsError> {
        self.fields
            .get(name)
            .copied()
            .ok_or_else(|| TracefsError::NoField {
                tracepoint: self.tracepoint.clone(),
                field: name.to_owned(),
            })
    }

    /// Offset of a field that must have one of the given sizes (guards against a kernel that
    /// changed a field's type under the same name).
    pub fn offset(&self, name: &str, sizes: &[u32]) -> Result<u32, TracefsError> {
        let f = self.field(name)?;
        if sizes.contains(&f.size) {
            Ok(f.offset)
        } else {
            Err(TracefsError::NoField {
                tracepoint: self.tracepoint.clone(),
                field: format!("{name} (size {} not in {sizes:?})", f.size),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MKDIR: &str = "name: cgroup_mkdir\nID: 1\nformat:\n\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n\tfield:int root;\toffset:8;\tsize:4;\tsigned:1;\n\tfield:int level;\toffset:12;\tsize:4;\tsigned:1;\n\tfield:u64 id;\toffset:16;\tsize:8;\tsigned:0;\n\tfield:__data_loc char[] path;\toffset:24;\tsize:4;\tsigned:0;\n\nprint fmt: \"root=%d\"\n";

    #[test]
    fn parses_fields() {
        let f = Format::parse("cgroup:cgroup_mkdir", MKDIR);
        assert_eq!(f.field("root").unwrap(), Field { offset: 8, size: 4 });
        assert_eq!(
            f.field("id").unwrap(),
            Field {
                offset: 16,
                size: 8
            }
        );
        assert_eq!(
            f.field("path").unwrap(),
            Field {
                offset: 24,
                size: 4
            }
        );
        assert_eq!(f.offset("id", &[8]).unwrap(), 16);
        assert!(f.offset("id", &[4]).is_err());
        assert!(matches!(f.field("nope"), Err(TracefsError::NoField { .. })));
    }

    #[test]
    fn parses_arrays_and_pointers() {
        let f = Format::parse(
            "x:y",
            "\tfield:char comm[16];\toffset:8;\tsize:16;\tsigned:0;\n\tfield:const char * name;\toffset:24;\tsize:8;\tsigned:0;\n",
        );
        assert_eq!(f.field("comm").unwrap().size, 16);
        assert_eq!(f.field("name").unwrap().offset, 24);
    }

    #[test]
    fn reads_the_running_kernel() {
        // Needs tracefs (root); say so loudly instead of passing silently.
        match Tracefs::find_or_mount() {
            Ok(t) => {
                let f = t.format("sched", "sched_process_exec").unwrap();
                assert!(f.field("pid").is_ok());
            }
            Err(e) => crate::skip_kernel_test("reads_the_running_kernel", &e),
        }
    }
}
