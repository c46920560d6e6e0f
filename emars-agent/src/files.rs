//! Whole-file replacement, for the files root writes where others may look or plant things
//! (exported configs, the store's checkpoint, reports and plots). Used by `store`, `policy` and
//! the CLI, so it lives below them all.

use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// A report or plot that could not be written, with where.
#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    #[error("creating {path}: {source}")]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "refusing to write into {path}: {why} (a directory someone else controls could have \
         the files redirected or replaced as they are written)"
    )]
    NotOurs { path: PathBuf, why: String },
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Creates `dir` (and its parents) for output such as reports, and refuses one that is a
/// symlink or is owned by another user than the one writing: `emars tune` runs as root and
/// writes into the current directory by default, which may be /tmp.
pub fn output_dir(dir: &Path) -> Result<(), OutputError> {
    std::fs::create_dir_all(dir).map_err(|source| OutputError::CreateDir {
        path: dir.to_owned(),
        source,
    })?;
    let meta = std::fs::symlink_metadata(dir).map_err(|source| OutputError::CreateDir {
        path: dir.to_owned(),
        source,
    })?;
    let not_ours = |why: String| OutputError::NotOurs {
        path: dir.to_owned(),
        why,
    };
    if meta.file_type().is_symlink() {
        return Err(not_ours("it is a symlink".to_owned()));
    }
    let me = rustix::process::geteuid().as_raw();
    if meta.uid() != me {
        return Err(not_ours(format!(
            "it belongs to uid {}, not to uid {me}",
            meta.uid()
        )));
    }
    Ok(())
}

/// Writes one output file whole through [`replace`] (a planted symlink is replaced, never
/// followed), readable by all.
pub fn write_output(path: &Path, content: &[u8]) -> Result<(), OutputError> {
    replace(path, content, 0o644).map_err(|source| OutputError::Write {
        path: path.to_owned(),
        source,
    })
}

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

/// The process holding a file lock on `file` (/proc/locks, read by procfs), matched by device
/// and inode.
pub fn lock_holder(file: &Path) -> Option<u32> {
    let meta = std::fs::metadata(file).ok()?;
    let (major, minor) = (rustix::fs::major(meta.dev()), rustix::fs::minor(meta.dev()));
    procfs::locks()
        .ok()?
        .into_iter()
        .find(|l| (l.devmaj, l.devmin, l.inode) == (major, minor, meta.ino()))
        .and_then(|l| u32::try_from(l.pid?).ok())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

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

    #[test]
    fn output_dirs_that_are_symlinks_or_others_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("a/b");
        output_dir(&out).unwrap();
        assert!(out.is_dir());
        output_dir(&out).unwrap(); // there already: fine
        let link = dir.path().join("link");
        symlink(&out, &link).unwrap();
        let e = output_dir(&link).unwrap_err().to_string();
        assert!(e.contains("is a symlink"), "{e}");
        let file = out.join("f.svg");
        symlink(dir.path().join("victim"), &file).unwrap();
        write_output(&file, b"<svg/>").unwrap();
        assert!(!dir.path().join("victim").exists(), "the link was followed");
        assert_eq!(std::fs::read(&file).unwrap(), b"<svg/>");
        if rustix::process::geteuid().is_root() {
            let theirs = dir.path().join("theirs");
            std::fs::create_dir(&theirs).unwrap();
            std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).unwrap();
            let e = output_dir(&theirs).unwrap_err().to_string();
            assert!(e.contains("belongs to uid 65534"), "{e}");
        }
    }
}
