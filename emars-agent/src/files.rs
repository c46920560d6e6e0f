//! Whole-file replacement, for the files root writes where others may look or plant things
//! (exported configs, the store's checkpoint). Used by `store` and `policy`, so it lives below
//! both.

use std::io::Write;
use std::path::Path;

/// Replaces `path` with `bytes`, whole or not at all: a temporary file with an unpredictable
/// name, created exclusively (O_EXCL: a planted file or symlink makes it fail, never followed)
/// with `mode`, synced, renamed over the target (rename replaces a symlink there instead of
/// following it), and the directory synced. A reader never sees half a file.
pub fn replace(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map_or_else(|| "file".into(), |n| n.to_string_lossy().into_owned());
    let mut tmp = tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .permissions(std::os::unix::fs::PermissionsExt::from_mode(mode))
        .tempfile_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{symlink, MetadataExt};

    use super::*;

    #[test]
    fn replaces_whole_with_its_mode_and_never_follows_a_symlink() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("t");
        let elsewhere = dir.path().join("elsewhere");
        std::fs::write(&elsewhere, b"keep").unwrap();
        symlink(&elsewhere, &target).unwrap();
        replace(&target, b"new", 0o600).unwrap();
        assert_eq!(std::fs::read(&elsewhere).unwrap(), b"keep");
        assert_eq!(std::fs::read(&target).unwrap(), b"new");
        let meta = std::fs::symlink_metadata(&target).unwrap();
        assert!(meta.is_file());
        assert_eq!(meta.mode() & 0o777, 0o600);
        // No temporary file left behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
    }
}
