//! A network namespace of the test's own, joined to the root namespace by a veth pair on a
//! private /24 (`10.231.N.1` the host end, `10.231.N.2` inside): a "host" of a fleet test whose
//! agent listens on an address that a Prometheus in the root namespace scrapes over a real
//! link. Removed on drop (also when the test panics); those left by killed test runs are
//! removed by the next one.
//!
//! Built with iproute2's `ip`: `ip netns add` makes the named namespace (the bind mount under
//! /run/netns) that operators inspect with the same tool, and creating and addressing a veth
//! pair by hand would mean a netlink client in the tests. Commands run inside with util-linux's
//! `nsenter --net=`, which enters the network namespace only: `ip netns exec` also unshares the
//! mount namespace and remounts /sys, which hides /sys/fs/cgroup and /sys/fs/bpf from the agent.

use std::{
    fs,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{bail, Context, Result};

/// The test namespaces' name prefix: `emars-test-<test pid>-<n>`.
const NS_PREFIX: &str = "emars-test-";
/// Host ends of the veth pairs: `emt<test pid>h<n>` (IFNAMSIZ allows 15 characters).
const LINK_PREFIX: &str = "emt";
/// Where `ip netns` keeps its named namespaces.
const NETNS_DIR: &str = "/run/netns";

static SEQ: AtomicU32 = AtomicU32::new(0);

pub struct NetNs {
    /// `ip netns` name.
    pub name: String,
    /// The host end of the veth pair, in the root namespace.
    pub host_link: String,
    /// The root namespace's address on the pair (10.231.N.1).
    pub host_addr: Ipv4Addr,
    /// The namespace's own address on the pair (10.231.N.2).
    pub addr: Ipv4Addr,
}

/// `ip ARGS`, which must succeed.
fn ip(args: &[&str]) -> Result<String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip (iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// The test pid in `rest` (what follows a prefix: `<pid>-<n>` or `<pid>h<n>`).
fn owner_pid(rest: &str) -> Option<u32> {
    let digits = rest.find(|c: char| !c.is_ascii_digit())?;
    rest[..digits].parse().ok()
}

/// Removes the namespaces and host links of test processes that are gone.
fn remove_stale() {
    if let Ok(entries) = fs::read_dir(NETNS_DIR) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(pid) = name.strip_prefix(NS_PREFIX).and_then(owner_pid) else {
                continue;
            };
            if !pid_alive(pid) {
                eprintln!("removing stale network namespace {name}");
                let _ = ip(&["netns", "delete", &name]);
            }
        }
    }
    // A host end outlives its namespace's removal while a process (a killed test's agent)
    // still holds the namespace.
    let Ok(links) = ip(&["-o", "link", "show", "type", "veth"]) else {
        return;
    };
    for line in links.lines() {
        // "7: emt123h0@if6: <BROADCAST,..."
        let Some(name) = line.split(": ").nth(1).and_then(|n| n.split('@').next()) else {
            continue;
        };
        let Some(pid) = name.strip_prefix(LINK_PREFIX).and_then(owner_pid) else {
            continue;
        };
        if !pid_alive(pid) {
            eprintln!("removing stale veth {name}");
            let _ = ip(&["link", "delete", name]);
        }
    }
}

/// A third octet N whose 10.231.N.0/24 no interface here uses, searched from a start that
/// differs between test processes and between the namespaces of one.
fn free_subnet(seq: u32) -> Result<u8> {
    let used = ip(&["-o", "-4", "addr", "show"])?;
    let start = std::process::id() as usize + 61 * seq as usize;
    (0..254)
        .map(|i| ((start + i) % 254 + 1) as u8)
        .find(|n| !used.contains(&format!(" 10.231.{n}.")))
        .context("every 10.231.N.0/24 is in use")
}

impl NetNs {
    /// A new namespace with `lo` up and a veth pair to the root namespace, both ends up and
    /// addressed.
    pub fn new() -> Result<Self> {
        if crate::find_program("nsenter").is_none() {
            bail!("nsenter (util-linux) missing: the tests run agents inside namespaces with it");
        }
        remove_stale();
        let pid = std::process::id();
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        let subnet = free_subnet(n)?;
        let ns = NetNs {
            name: format!("{NS_PREFIX}{pid}-{n}"),
            host_link: format!("{LINK_PREFIX}{pid}h{n}"),
            host_addr: Ipv4Addr::new(10, 231, subnet, 1),
            addr: Ipv4Addr::new(10, 231, subnet, 2),
        };
        ip(&["netns", "add", &ns.name])?;
        // From here on Drop removes what was made.
        let peer = format!("{LINK_PREFIX}{pid}p{n}");
        ip(&[
            "link",
            "add",
            &ns.host_link,
            "type",
            "veth",
            "peer",
            "name",
            &peer,
            "netns",
            &ns.name,
        ])?;
        ip(&[
            "addr",
            "add",
            &format!("{}/24", ns.host_addr),
            "dev",
            &ns.host_link,
        ])?;
        ip(&["link", "set", &ns.host_link, "up"])?;
        let inside = |args: &[&str]| {
            let mut a = vec!["-n", ns.name.as_str()];
            a.extend_from_slice(args);
            ip(&a)
        };
        inside(&["addr", "add", &format!("{}/24", ns.addr), "dev", &peer])?;
        inside(&["link", "set", &peer, "up"])?;
        inside(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// The namespace's file (what `nsenter --net=` and setns take).
    pub fn path(&self) -> PathBuf {
        Path::new(NETNS_DIR).join(&self.name)
    }

    /// The wrapper that runs a program inside (for [`crate::Agent::start_full`]): `nsenter
    /// --net=<path>`, which execs the program in place (its pid is the program's).
    pub fn wrapper(&self) -> Vec<String> {
        vec!["nsenter".into(), self.nsenter_net()]
    }

    /// `program` to be run inside the namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(self.nsenter_net()).arg(program);
        c
    }

    fn nsenter_net(&self) -> String {
        format!("--net={}", self.path().display())
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // Deleting one end of a veth pair deletes both.
        if let Err(e) = ip(&["link", "delete", &self.host_link]) {
            eprintln!("{e}");
        }
        if let Err(e) = ip(&["netns", "delete", &self.name]) {
            eprintln!("{e}");
        }
    }
}
