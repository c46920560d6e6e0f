//! Which memcg stat items make up a cgroup's charged memory, and in what unit, read from the
//! running kernel's BTF (enum node_stat_item / memcg_stat_item): item numbers change between
//! kernel versions, so they are never baked in.

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
    OutOfRange { name: String, value: u32 },
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

/// Reads the usage items from BTF (normally /sys/kernel/btf/vmlinux).
pub fn usage_items(
    btf_path: &Path,
    v1: bool,
    page_size: u64,
) -> Result<Vec<UsageItem>, ItemsError> {
    let err = |message: String| ItemsError::Btf {
        path: btf_path.display().to_string(),
        message,
    };
    let btf = btf_rs::Btf::from_file(btf_path).map_err(|e| err(e.to_string()))?;
    let mut values = std::collections::HashMap::new();
    for enum_name in ["node_stat_item", "memcg_stat_item"] {
        let types = btf
            .resolve_types_by_name(enum_name)
            .map_err(|e| err(format!("enum {enum_name}: {e}")))?;
        for t in types {
            if let btf_rs::Type::Enum(e) = t {
                for m in &e.members {
                    if let Ok(n) = btf.resolve_name(m) {
                        values.insert(n, m.val());
                    }
                }
            }
        }
    }
    let wanted = if v1 { USAGE_ITEMS_V1 } else { USAGE_ITEMS_V2 };
    wanted
        .iter()
        .map(|name| {
            let item = *values
                .get(*name)
                .ok_or_else(|| ItemsError::Missing((*name).to_owned()))?;
            if item >= MAX_MEMCG_ITEMS {
                return Err(ItemsError::OutOfRange {
                    name: (*name).to_owned(),
                    value: item,
                });
            }
            Ok(UsageItem {
                name: (*name).to_owned(),
                item,
                unit: unit_of(name, page_size),
            })
        })
        .collect()
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

/// Byte offset of `member` in `struct_name`, looking through anonymous structs and unions.
fn member_offset(btf: &btf_rs::Btf, struct_name: &str, member: &str) -> Result<u32, String> {
    let types = btf
        .resolve_types_by_name(struct_name)
        .map_err(|e| format!("struct {struct_name}: {e}"))?;
    let s = types
        .iter()
        .find_map(|t| match t {
            btf_rs::Type::Struct(s) if !s.members.is_empty() => Some(s),
            _ => None,
        })
        .ok_or_else(|| format!("no struct {struct_name} in BTF"))?;
    find_member(btf, s, member, 0)
        .ok_or_else(|| format!("struct {struct_name} has no member {member}"))
}

fn find_member(btf: &btf_rs::Btf, s: &btf_rs::Struct, member: &str, base_bits: u32) -> Option<u32> {
    for m in &s.members {
        let name = btf.resolve_name(m).unwrap_or_default();
        let bits = base_bits + m.bit_offset();
        if name == member {
            return bits.is_multiple_of(8).then_some(bits / 8);
        }
        if name.is_empty() {
            if let Ok(btf_rs::Type::Struct(inner) | btf_rs::Type::Union(inner)) =
                btf.resolve_chained_type(m)
            {
                if let Some(off) = find_member(btf, &inner, member, bits) {
                    return Some(off);
                }
            }
        }
    }
    None
}

/// The kernel structure layout the raw rmdir program needs, from BTF.
pub fn kernel_layout(
    btf_path: &Path,
    page_size: u64,
) -> Result<emars_common::KernelLayout, ItemsError> {
    let err = |message: String| ItemsError::Btf {
        path: btf_path.display().to_string(),
        message,
    };
    let btf = btf_rs::Btf::from_file(btf_path).map_err(|e| err(e.to_string()))?;
    let off = |s: &str, m: &str| member_offset(&btf, s, m).map_err(err);
    let mut memory_cgrp_id = None;
    for t in btf
        .resolve_types_by_name("cgroup_subsys_id")
        .map_err(|e| err(format!("enum cgroup_subsys_id: {e}")))?
    {
        if let btf_rs::Type::Enum(e) = t {
            memory_cgrp_id = e
                .members
                .iter()
                .find(|m| btf.resolve_name(*m).is_ok_and(|n| n == "memory_cgrp_id"))
                .map(|m| m.val());
        }
    }
    Ok(emars_common::KernelLayout {
        valid: 1,
        memory_cgrp_id: memory_cgrp_id
            .ok_or_else(|| ItemsError::Missing("memory_cgrp_id".into()))?,
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
