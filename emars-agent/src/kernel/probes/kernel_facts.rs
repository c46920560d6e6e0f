//! What the running kernel offers the programs, read before the load: the tracepoints'
//! formats (offsets into `ProbeConfig`), the BTF layout and memcg stat items, and the
//! kernel's own watermark file. What cannot be used is reported; the program that needs it
//! is then not attached.

use std::{collections::BTreeMap, path::Path};

use emars_common::{AttachTpOffsets, CgroupTpOffsets, MemcgTpOffsets, ProbeConfig};

use super::{
    loader::{ProbeReport, SPECS},
    memcg_items::KernelBtf,
    tracefs::{Format, Tracefs, TracefsError},
};
use crate::kernel::cgroupfs::{CgroupVersion, MemoryHierarchy};

/// The tracepoints' offsets into `config`; a tracepoint whose format cannot be used is
/// reported (its program is then not attached), not fatal. Returns those, by program.
pub(super) fn tracepoint_offsets(
    tracefs: &Tracefs,
    config: &mut ProbeConfig,
    report: &mut ProbeReport,
) -> BTreeMap<&'static str, String> {
    let mut unusable: BTreeMap<&str, String> = BTreeMap::new();
    for s in SPECS.iter().filter(|s| s.category != "raw") {
        let present = tracefs.exists(s.category, s.tracepoint);
        report.features.insert(
            format!("tracepoint {}:{}", s.category, s.tracepoint),
            present,
        );
        let r = tracefs
            .format(s.category, s.tracepoint)
            .and_then(|f| fill_offsets(config, s.program, &f));
        if let Err(e) = r {
            unusable.insert(s.program, e.to_string());
        }
    }
    unusable
}

/// The kernel's BTF, parsed once: the structure layout (the watermark at rmdir) into
/// `config`, the memcg stat items into the report; a program that needs what is missing goes
/// into `unusable`.
pub(super) fn kernel_btf(
    version: CgroupVersion,
    config: &mut ProbeConfig,
    report: &mut ProbeReport,
    unusable: &mut BTreeMap<&'static str, String>,
) {
    let btf = Path::new("/sys/kernel/btf/vmlinux");
    report.features.insert("btf".into(), btf.exists());
    // SAFETY: sysconf has no preconditions.
    let page_size = match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
        n if n > 0 => n as u64,
        _ => 4096,
    };
    let parsed = KernelBtf::load(btf);
    let layout_feature = "kernel watermark at rmdir (BTF layout)";
    match parsed
        .as_ref()
        .map_err(|e| e.to_string())
        .and_then(|b| b.kernel_layout(page_size).map_err(|e| e.to_string()))
    {
        Ok(layout) => {
            config.layout = layout;
            report.features.insert(layout_feature.into(), true);
        }
        Err(e) => {
            report.features.insert(layout_feature.into(), false);
            unusable.insert("raw_cgroup_rmdir", format!("kernel layout unknown: {e}"));
        }
    }
    let v1 = version == CgroupVersion::V1;
    match parsed
        .as_ref()
        .map_err(|e| e.to_string())
        .and_then(|b| b.usage_items(v1, page_size).map_err(|e| e.to_string()))
    {
        Ok(items) => report.usage_items = items,
        Err(e) => {
            for s in SPECS.iter().filter(|s| s.memcg) {
                unusable
                    .entry(s.program)
                    .or_insert_with(|| format!("memcg stat items unknown: {e}"));
            }
        }
    }
}

/// The kernel watermark file of this cgroup version, and whether the hierarchy has it.
pub(super) fn peak_file_feature(
    hierarchy: &MemoryHierarchy,
    report: &mut ProbeReport,
) -> &'static str {
    let peak_file = match hierarchy.version {
        CgroupVersion::V1 => "memory.max_usage_in_bytes",
        CgroupVersion::V2 => "memory.peak",
    };
    report.features.insert(
        format!("{peak_file} (kernel watermark)"),
        hierarchy.mount.join(peak_file).exists()
            || std::fs::read_dir(&hierarchy.mount)
                .into_iter()
                .flatten()
                .flatten()
                .any(|e| e.path().join(peak_file).exists()),
    );
    peak_file
}

pub(super) fn fill_offsets(
    c: &mut ProbeConfig,
    program: &str,
    f: &Format,
) -> Result<(), TracefsError> {
    let cgroup = |f: &Format| -> Result<CgroupTpOffsets, TracefsError> {
        Ok(CgroupTpOffsets {
            root: f.offset("root", &[4])?,
            level: f.offset("level", &[4])?,
            id: f.offset("id", &[8])?,
            path: f.offset("path", &[4])?,
        })
    };
    let memcg = |f: &Format| -> Result<MemcgTpOffsets, TracefsError> {
        Ok(MemcgTpOffsets {
            id: f.offset("id", &[8])?,
            item: f.offset("item", &[4])?,
            val: f.offset("val", &[4, 8])?,
            val_size: f.field("val")?.size,
        })
    };
    match program {
        "cgroup_mkdir" => c.mkdir = cgroup(f)?,
        "cgroup_rmdir" => c.rmdir = cgroup(f)?,
        "cgroup_attach_task" => {
            c.attach = AttachTpOffsets {
                root: f.offset("dst_root", &[4])?,
                level: f.offset("dst_level", &[4])?,
                id: f.offset("dst_id", &[8])?,
                pid: f.offset("pid", &[4])?,
                path: f.offset("dst_path", &[4])?,
                _pad: 0,
            }
        }
        "sched_process_fork" => {
            c.fork_parent_pid = f.offset("parent_pid", &[4])?;
            c.fork_child_pid = f.offset("child_pid", &[4])?;
        }
        "sched_process_exec" => {
            c.exec_pid = f.offset("pid", &[4])?;
            c.exec_filename = f.offset("filename", &[4])?;
        }
        "sched_process_exit" => c.exit_pid = f.offset("pid", &[4])?,
        "oom_mark_victim" => c.oom_pid = f.offset("pid", &[4])?,
        "memcg_mod_memcg_state" => c.memcg_state = memcg(f)?,
        "memcg_mod_memcg_lruvec_state" => c.memcg_lruvec = memcg(f)?,
        _ => {}
    }
    Ok(())
}
