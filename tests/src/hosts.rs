//! The hosts of a fleet test on one machine: each a network namespace of the test's own
//! ([`NetNs`]), a watched cgroup root of its own and a real agent started inside the namespace,
//! listening on the namespace's address so that a Prometheus in the root namespace scrapes it
//! over the veth link, as it would scrape another machine.

use std::{fs, path::PathBuf};

use anyhow::{ensure, Result};

use crate::{netns::NetNs, run_alloc, u64_of, Agent, TestRoot};

/// One host. Fields drop in order: the agent first, then its cgroups, then its namespace.
pub struct Host {
    pub agent: Agent,
    pub root: TestRoot,
    pub ns: NetNs,
}

impl Host {
    /// A host whose agent has a fresh store and `extra` in its config (as
    /// [`Agent::start_configured`]; `{dir}` is the agent's own directory), its API on the
    /// namespace's address.
    pub fn start(extra: &str) -> Result<Host> {
        Self::start_in(NetNs::new()?, extra)
    }

    /// [`Host::start`] in a namespace made beforehand (whose host address a server the agent
    /// asks, such as Prometheus, is to listen on).
    pub fn start_in(ns: NetNs, extra: &str) -> Result<Host> {
        let root = TestRoot::new()?;
        let tmp = tempfile::tempdir()?;
        let store = tmp.path().join("store");
        let extra = format!(
            "[api]\nlisten = \"{}:0\"\nallow_remote = true\n{}",
            ns.addr,
            extra.replace("{dir}", &tmp.path().display().to_string())
        );
        let agent = Agent::start_full(&root, &store, &extra, Some(tmp), &ns.wrapper(), None)?;
        Ok(Host { agent, root, ns })
    }

    /// The agent's API address (`10.231.N.2:port`), a scrape target.
    pub fn target(&self) -> String {
        self.agent.addr.clone()
    }

    /// Runs one instance of `function` per entry of `mibs`, each allocating that many MiB,
    /// one after the other, each cgroup removed when its process ended; returns the peaks the
    /// agent recorded, in the order run.
    pub fn run_instances(&self, function: &str, mibs: &[u64]) -> Result<Vec<u64>> {
        let before = self.agent.instances(function)?.len();
        let mut names = Vec::new();
        for mib in mibs {
            let name = format!("i{}", before + names.len());
            let dir = self.root.instance_dir(function, &name)?;
            ensure!(run_alloc(&dir, *mib, 0, 0)?.success(), "{name} failed");
            fs::remove_dir(&dir)?;
            names.push(name);
        }
        let ended = self.agent.wait_ended(function, before + mibs.len())?;
        names
            .iter()
            .map(|n| {
                let r = ended.iter().find(|r| r["instance"] == n.as_str());
                r.map(|r| u64_of(r, "peak_bytes"))
                    .ok_or_else(|| anyhow::anyhow!("{function}/{n} not recorded: {ended:?}"))
            })
            .collect()
    }

    /// The instance cgroup `<root>/<function>/<instance>` (created).
    pub fn instance_dir(&self, function: &str, instance: &str) -> Result<PathBuf> {
        self.root.instance_dir(function, instance)
    }
}
