//! The host's side of start-up: the privilege the agent needs, the watched roots made where
//! they are EMARS's own and locked for the agent's life, and the descriptor limit raised.

use anyhow::Context as _;

use crate::kernel::cgroupfs::{CgroupVersion, MemoryHierarchy};
use crate::kernel::netcount::NetHierarchy;

/// Raises the soft limit on open descriptors to the hard one: the API's connection cap is far
/// below either, and cgroup writes must never run short.
pub(super) fn raise_fd_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut l = getrlimit(Resource::Nofile);
    if l.current < l.maximum {
        l.current = l.maximum;
        if let Err(e) = setrlimit(Resource::Nofile, l) {
            tracing::debug!("raising RLIMIT_NOFILE: {e}");
        }
    }
}

/// Creates a missing watched root (`create`): it is EMARS's own, so a platform can start
/// creating instances in it. On v2, enables the memory controller for its children. A missing
/// root the operator expects a platform to make is reported and left alone: cgroups created
/// under it later are still seen (the kernel side matches their paths).
pub(super) fn ensure_root(h: &MemoryHierarchy, root: &str, create: bool) -> anyhow::Result<()> {
    let dir = h.dir(root);
    // A root given with the hierarchy's own mount in front (a custom cgroup.mount).
    let mount = h.mount.to_string_lossy();
    if mount.len() > 1 && root.starts_with(&format!("{mount}/")) {
        anyhow::bail!(
            "watched root {root} is a filesystem path: a root is the path below the memory \
             hierarchy's mount {mount}, as /proc/<pid>/cgroup shows it: write \"{}\"",
            &root[mount.len()..]
        );
    }
    if dir.is_dir() {
        return Ok(());
    }
    if !create {
        tracing::warn!(
            "watched root {} does not exist (create = false): nothing is tracked until it is \
             made; if it should be there, check its path ({})",
            dir.display(),
            top_level_cgroups(h)
        );
        return Ok(());
    }
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("creating watched root {}", dir.display()))?;
    if root == crate::config::DEFAULT_ROOT {
        // The default root is EMARS's own: made at every boot, nothing to check.
        tracing::info!("created watched root {}", dir.display());
    } else {
        tracing::warn!(
            "created watched root {}: it did not exist; instances are the cgroups a platform \
             creates below it. If a platform should have made it, check the path and set \
             create = false for it ({})",
            dir.display(),
            top_level_cgroups(h)
        );
    }
    if h.version == CgroupVersion::V2 {
        let ctl = dir.join("cgroup.subtree_control");
        std::fs::write(&ctl, "+memory")
            .with_context(|| format!("enabling the memory controller in {}", ctl.display()))?;
    }
    Ok(())
}

/// On a hybrid host, makes a missing watched root that is EMARS's own (`create`) in the cgroup
/// v2 hierarchy too: the socket program that counts requests is attached there, and a
/// platform such as runc puts each instance in every hierarchy under the same path. On pure
/// v2 it is the memory root's own directory, made by [`ensure_root`]. Not fatal: without it
/// requests are not counted in the kernel, as `/v1/info` says.
pub(super) fn ensure_net_root(net: &NetHierarchy, root: &str, create: bool) {
    let dir = net.dir(root);
    if net.same_ids || !create || dir.is_dir() {
        return;
    }
    match std::fs::create_dir_all(&dir) {
        Ok(()) => tracing::info!(
            "created watched root {} in the cgroup v2 hierarchy, where requests are counted",
            dir.display()
        ),
        Err(e) => tracing::warn!(
            "creating watched root {} in the cgroup v2 hierarchy: {e}; its requests are not \
             counted in the kernel",
            dir.display()
        ),
    }
}

/// Refuses to start without the privilege the agent needs, with what it needs, rather than a
/// bare EPERM from the first bpf() or cgroup write: root, or CAP_BPF with CAP_PERFMON (or
/// CAP_SYS_ADMIN) for the programs, and CAP_SYS_RESOURCE and CAP_DAC_OVERRIDE for the files.
pub fn check_privilege() -> anyhow::Result<()> {
    const CAP_DAC_OVERRIDE: u32 = 1;
    const CAP_SYS_ADMIN: u32 = 21;
    const CAP_SYS_RESOURCE: u32 = 24;
    const CAP_PERFMON: u32 = 38;
    const CAP_BPF: u32 = 39;
    if rustix::process::geteuid().is_root() {
        return Ok(());
    }
    let eff = procfs::process::Process::myself()
        .and_then(|p| p.status())
        .map_or(0, |s| s.capeff);
    let has = |cap: u32| eff & (1 << cap) != 0;
    let programs = has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_PERFMON));
    if programs && has(CAP_SYS_RESOURCE) && has(CAP_DAC_OVERRIDE) {
        return Ok(());
    }
    anyhow::bail!(
        "emars agent needs root (or CAP_BPF, CAP_PERFMON, CAP_SYS_RESOURCE and \
         CAP_DAC_OVERRIDE): it loads eBPF programs and writes cgroup limits. Run it with sudo, \
         or as the emars.service unit (deploy/systemd); the other commands need no privilege \
         to read"
    )
}

/// Takes an exclusive lock (flock) on each existing watched root's directory for the agent's
/// life; the kernel drops it when the agent exits, a kill -9 included. Refuses to start when
/// another process holds one, naming it.
pub(super) fn lock_roots(
    h: &MemoryHierarchy,
    roots: &[String],
) -> anyhow::Result<Vec<std::fs::File>> {
    use rustix::fs::{flock, FlockOperation};
    let mut held = Vec::new();
    for root in roots {
        let dir = h.dir(root);
        // A root that does not exist yet (create = false) cannot be locked: said at start.
        let Ok(file) = std::fs::File::open(&dir) else {
            continue;
        };
        match flock(&file, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => held.push(file),
            Err(rustix::io::Errno::WOULDBLOCK) => {
                let holder = crate::files::lock_holder(&dir)
                    .map(|p| format!(" (pid {p})"))
                    .unwrap_or_default();
                anyhow::bail!(
                    "another agent{holder} watches {}: two agents on one root would both \
                     write its limits; stop it, or give this agent other cgroup.roots",
                    dir.display()
                );
            }
            Err(e) => tracing::warn!("locking watched root {}: {e}", dir.display()),
        }
    }
    Ok(held)
}

/// The cgroups at the top of the hierarchy, for messages about a root that is not there.
fn top_level_cgroups(h: &MemoryHierarchy) -> String {
    let mut names: Vec<String> = std::fs::read_dir(&h.mount)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| format!("/{}", e.file_name().to_string_lossy()))
        .collect();
    names.sort();
    let more = names.len().saturating_sub(12);
    names.truncate(12);
    let more = if more > 0 {
        format!(" and {more} more")
    } else {
        String::new()
    };
    format!("top-level cgroups here: {}{more}", names.join(", "))
}
