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
            eprintln!("SKIPPED running_kernel_has_the_items: no {}", p.display());
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
