//! Builds the eBPF programs (emars-ebpf) with the nightly toolchain and bpf-linker; the object
//! lands in OUT_DIR/emars and is embedded by `probes::loader`. `cargo xtask setup` installs both.
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../emars-ebpf");
    let root = root
        .to_str()
        .ok_or_else(|| anyhow::anyhow!("non-UTF-8 path {}", root.display()))?
        .to_owned();
    aya_build::build_ebpf(
        [Package {
            name: "emars-ebpf",
            root_dir: &root,
            ..Default::default()
        }],
        Toolchain::Nightly,
    )
}
