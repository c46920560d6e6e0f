//! Which memcg stat items make up a cgroup's charged memory, and in what unit, read from the
//! running kernel's BTF (enum node_stat_item / memcg_stat_item): item numbers change between
//! kernel versions, so they are never baked in. The same BTF gives the structure layout the
//! raw rmdir program reads. Parsed with btfparse (Apache-2.0, compatible with the workspace's
//! licence, unlike the LGPL btf-rs used before).

use std::path::Path;

use emars_common::MAX_MEMCG_ITEMS;

/// Items whose sum tracks the memory page counter: user pages (anon mapped + page cache,
/// which includes shmem and swap cache) and kernel memory charged to the cgroup (kmem, and
/// socket buffers, which cgroup v1 charges to a separate counter).
const USAGE_ITEMS_V2: &[&str] = &[
    "NR_ANON_MAPPED",
    "NR_FILE_PAGES",
    "MEMCG_KMEM",
    "MEMCG_SOCK",
];
const USAGE_ITEMS_V1: &[&str] = &["NR_ANON_MAPPED", "NR_FILE_PAGES", "MEMCG_KMEM"];

#[derive(Debug, thiserror::Error)]
pub enum ItemsError {
    #[error("reading BTF {path}: {message}")]
    Btf { path: String, message: String },
    #[error("BTF has no enum item {0}")]
    Missing(String),
    #[error("enum item {name} = {value} is beyond the table of {MAX_MEMCG_ITEMS} entries")]
    OutOfRange { name: String, value: i64 },
}

/// One memcg stat item counted into usage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageItem {
    pub name: String,
    pub item: u32,
    /// Bytes per unit of the tracepoint's `val`.
    pub unit: u64,
}

/// The kernel's unit for a stat item, as memcg_page_state_unit() derives it from the name.
fn unit_of(name: &str, page_size: u64) -> u64 {
    if name.ends_with("_B") {
        1
    } else if name.ends_with("_KB") {
        1024
    } else {
        page_size
    }
}

/// The running kernel's BTF, parsed (btfparse, Apache-2.0).
pub struct KernelBtf {
    path: String,
    types: btfparse::TypeInformation,
}

/// The bytes of a BTF file, for btfparse.
struct Bytes(Vec<u8>);

impl btfparse::Readable for Bytes {
    fn read(&self, offset: u64, buffer: &mut [u8]) -> btfparse::Result<()> {
        let src = usize::try_from(offset)
            .ok()
            .and_then(|start| self.0.get(start..start.checked_add(buffer.len())?))
            .ok_or_else(|| {
                btfparse::Error::new(btfparse::ErrorKind::EOF, "read past the end of the BTF")
            })?;
        buffer.copy_from_slice(src);
        Ok(())
    }
}

impl KernelBtf {
    /// Reads and parses a BTF file (normally /sys/kernel/btf/vmlinux).
    pub fn load(path: &Path) -> Result<KernelBtf, ItemsError> {
        let shown = path.display().to_string();
        let err = |message: String| ItemsError::Btf {
            path: shown.clone(),
            message,
        };
        let bytes = std::fs::read(path).map_err(|e| err(e.to_string()))?;
        let types =
            btfparse::TypeInformation::new(&Bytes(bytes)).map_err(|e| err(format!("{e:?}")))?;
        Ok(KernelBtf { path: shown, types })
    }

    fn err(&self, message: String) -> ItemsError {
        ItemsError::Btf {
            path: self.path.clone(),
            message,
        }
    }

    /// The values of an enum's items, by name.
    fn enum_values(&self, enum_name: &str) -> Result<Vec<(String, i64)>, ItemsError> {
        let tid = self
            .types
            .id_of(enum_name)
            .ok_or_else(|| self.err(format!("no enum {enum_name}")))?;
        match self.types.from_id(tid) {
            Some(btfparse::TypeVariant::Enum(e)) => Ok(e
                .named_value_list()
                .iter()
                .map(|v| {
                    let n = match v.value {
                        btfparse::Integer32Value::Signed(n) => i64::from(n),
                        btfparse::Integer32Value::Unsigned(n) => i64::from(n),
                    };
                    (v.name.clone(), n)
                })
                .collect()),
            Some(btfparse::TypeVariant::Enum64(e)) => Ok(e
                .named_value_list()
                .iter()
                .filter_map(|v| {
                    let n = match v.value {
                        btfparse::Integer64Value::Signed(n) => n,
                        btfparse::Integer64Value::Unsigned(n) => i64::try_from(n).ok()?,
                    };
                    Some((v.name.clone(), n))
                })
                .collect()),
            _ => Err(self.err(format!("{enum_name} is not an enum"))),
        }
    }

    /// Byte offset of `member` in `struct_name`, looking through anonymous structs and unions.
    fn member_offset(&self, struct_name: &str, member: &str) -> Result<u32, ItemsError> {
        let tid = self
            .types
            .id_of(struct_name)
            .ok_or_else(|| self.err(format!("no struct {struct_name}")))?;
        match self.types.offset_of(tid, member) {
            Ok((_, btfparse::Offset::ByteOffset(off))) => Ok(off),
            Ok((_, btfparse::Offset::BitOffsetAndSize(..))) => {
                Err(self.err(format!("{struct_name}.{member} is a bitfield")))
            }
            Err(e) => Err(self.err(format!("{struct_name}.{member}: {e:?}"))),
        }
    }

    /// The usage items and their units.
    pub fn usage_items(&self, v1: bool, page_size: u64) -> Result<Vec<UsageItem>, ItemsError> {
        let mut values = std::collections::HashMap::new();
        for enum_name in ["node_stat_item", "memcg_stat_item"] {
            values.extend(self.enum_values(enum_name)?);
        }
        let wanted = if v1 { USAGE_ITEMS_V1 } else { USAGE_ITEMS_V2 };
        wanted
            .iter()
            .map(|name| {
                let value = *values
                    .get(*name)
                    .ok_or_else(|| ItemsError::Missing((*name).to_owned()))?;
                let item = u32::try_from(value)
                    .ok()
                    .filter(|i| *i < MAX_MEMCG_ITEMS)
                    .ok_or_else(|| ItemsError::OutOfRange {
                        name: (*name).to_owned(),
                        value,
                    })?;
                Ok(UsageItem {
                    name: (*name).to_owned(),
                    item,
                    unit: unit_of(name, page_size),
                })
            })
            .collect()
    }

    /// The kernel structure layout the raw rmdir program needs.
    pub fn kernel_layout(&self, page_size: u64) -> Result<emars_common::KernelLayout, ItemsError> {
        let off = |s: &str, m: &str| self.member_offset(s, m);
        let memory_cgrp_id = self
            .enum_values("cgroup_subsys_id")?
            .into_iter()
            .find(|(n, _)| n == "memory_cgrp_id")
            .and_then(|(_, v)| u32::try_from(v).ok())
            .ok_or_else(|| ItemsError::Missing("memory_cgrp_id".into()))?;
        Ok(emars_common::KernelLayout {
            valid: 1,
            memory_cgrp_id,
            cgroup_kn: off("cgroup", "kn")?,
            cgroup_root: off("cgroup", "root")?,
            cgroup_subsys: off("cgroup", "subsys")?,
            kernfs_node_id: off("kernfs_node", "id")?,
            root_hierarchy_id: off("cgroup_root", "hierarchy_id")?,
            memcg_css: off("mem_cgroup", "css")?,
            memcg_memory: off("mem_cgroup", "memory")?,
            page_counter_watermark: off("page_counter", "watermark")?,
            _pad: 0,
            page_size,
        })
    }
}

/// Reads the usage items from BTF (normally /sys/kernel/btf/vmlinux).
pub fn usage_items(
    btf_path: &Path,
    v1: bool,
    page_size: u64,
) -> Result<Vec<UsageItem>, ItemsError> {
    KernelBtf::load(btf_path)?.usage_items(v1, page_size)
}

/// The kernel structure layout the raw rmdir program needs, from BTF.
pub fn kernel_layout(
    btf_path: &Path,
    page_size: u64,
) -> Result<emars_common::KernelLayout, ItemsError> {
    KernelBtf::load(btf_path)?.kernel_layout(page_size)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_follow_kernel_naming() {
        assert_eq!(unit_of("NR_SLAB_RECLAIMABLE_B", 4096), 1);
        assert_eq!(unit_of("NR_KERNEL_STACK_KB", 4096), 1024);
        assert_eq!(unit_of("NR_ANON_MAPPED", 4096), 4096);
    }

    #[test]
    fn running_kernel_has_the_items() {
        let p = Path::new("/sys/kernel/btf/vmlinux");
        if !p.exists() {
            crate::skip_kernel_test(
                "running_kernel_has_the_items",
                &format!("no {}", p.display()),
            );
            return;
        }
        let items = usage_items(p, false, 4096).unwrap();
        assert_eq!(items.len(), USAGE_ITEMS_V2.len());
        let kmem = items.iter().find(|i| i.name == "MEMCG_KMEM").unwrap();
        let anon = items.iter().find(|i| i.name == "NR_ANON_MAPPED").unwrap();
        // memcg_stat_item starts after the node items.
        assert!(kmem.item > anon.item);
    }
}

#[cfg(test)]
mod layout_tests {
    use super::*;

    #[test]
    fn running_kernel_layout() {
        let p = Path::new("/sys/kernel/btf/vmlinux");
        if !p.exists() {
            crate::skip_kernel_test("running_kernel_layout", &format!("no {}", p.display()));
            return;
        }
        let l = kernel_layout(p, 4096).unwrap();
        assert_eq!(l.valid, 1);
        // css is the first member of struct mem_cgroup on every kernel EMARS supports.
        assert_eq!(l.memcg_css, 0);
        assert!(l.memcg_memory > 0 && l.cgroup_subsys > 0);
    }
}
