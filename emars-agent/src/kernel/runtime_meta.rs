//! Reading a container runtime's metadata file (runc's `state.json`, an OCI `config.json`,
//! Docker's `config.v2.json`, under /run or /var/lib): safely, and only the bytes. What the
//! bytes mean (labels, the runtime's memory limit) is `model::runtime`'s to say.

use std::{fs::File, io::Read, os::unix::fs::OpenOptionsExt, path::Path};

/// Largest metadata file read (runc's state.json of a large spec is some tens of KiB).
pub const MAX_METADATA_BYTES: u64 = 4 << 20;

/// What reading a metadata file gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileRead {
    Bytes(Vec<u8>),
    /// Not there (yet: runc writes its state after it creates the cgroup).
    Absent,
    /// There but unusable: not a regular file, too large, unreadable (the reason, with the
    /// path).
    Unusable(String),
}

/// Reads `path` without following it into anything but a regular file: the file is opened
/// non-blocking, so a FIFO planted there cannot stall the agent; at most
/// [`MAX_METADATA_BYTES`].
pub fn read(path: &Path) -> FileRead {
    let file = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return FileRead::Absent,
        Err(e) => return FileRead::Unusable(format!("{}: {e}", path.display())),
    };
    match read_regular(file, path) {
        Ok(bytes) => FileRead::Bytes(bytes),
        Err(e) => FileRead::Unusable(e),
    }
}

fn read_regular(file: File, path: &Path) -> Result<Vec<u8>, String> {
    let meta = file
        .metadata()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if !meta.is_file() {
        return Err(format!("{}: not a regular file", path.display()));
    }
    if meta.len() > MAX_METADATA_BYTES {
        return Err(format!(
            "{}: {} bytes, more than the {MAX_METADATA_BYTES} read",
            path.display(),
            meta.len()
        ));
    }
    let mut text = Vec::with_capacity(meta.len() as usize);
    file.take(MAX_METADATA_BYTES)
        .read_to_end(&mut text)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(text)
}
