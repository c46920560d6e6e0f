//! The write token: proof of privilege for every mutating request.
//!
//! Generated at first start from the kernel's random source into a file only root can read
//! (mode 0600, created exclusively, never through a symlink). Platforms send it over TCP as
//! `Authorization: Bearer <token>`; the CLI writes through the local socket, which needs none,
//! and sends the token over TCP only when told both the address and the token file. A local
//! user who cannot read the file cannot write limits, which is as strict as the cgroup files
//! the agent writes.

use std::{
    fs, io,
    io::{Read, Write},
    os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
};

/// Bytes of randomness in a token (hex-encoded in the file: 64 characters).
const TOKEN_BYTES: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("API token file {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error(
        "API token file {path} is {what}; the token may have leaked: remove the file and restart \
         the agent to generate a new one"
    )]
    Unsafe { path: PathBuf, what: String },
    #[error("API token file {path} does not hold a token (64 hex characters): remove it and restart the agent")]
    Malformed { path: PathBuf },
    #[error("the API token file {path} {what}")]
    Unreadable { path: PathBuf, what: String },
}

/// The agent's write token.
#[derive(Clone)]
pub struct Token(String);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(…)")
    }
}

impl Token {
    /// Reads the token at `path`, or generates one there if there is none.
    pub fn load_or_create(path: &Path) -> Result<Token, TokenError> {
        let err = |source| TokenError::Io {
            path: path.to_owned(),
            source,
        };
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).map_err(err)?;
        }
        match fs::symlink_metadata(path) {
            Ok(meta) => {
                check_private(path, &meta)?;
                Self::read(path)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Self::create(path),
            Err(e) => Err(err(e)),
        }
    }

    fn create(path: &Path) -> Result<Token, TokenError> {
        let err = |source| TokenError::Io {
            path: path.to_owned(),
            source,
        };
        let mut raw = [0u8; TOKEN_BYTES];
        let mut filled = 0;
        while filled < raw.len() {
            filled +=
                rustix::rand::getrandom(&mut raw[filled..], rustix::rand::GetRandomFlags::empty())
                    .map_err(|e| err(e.into()))?;
        }
        let token: String = raw.iter().map(|b| format!("{b:02x}")).collect();
        // O_EXCL: a file or symlink planted there makes this fail instead of being followed.
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)
            .map_err(err)?;
        f.write_all(format!("{token}\n").as_bytes()).map_err(err)?;
        f.sync_all().map_err(err)?;
        tracing::info!("generated the API write token in {}", path.display());
        Ok(Token(token))
    }

    fn read(path: &Path) -> Result<Token, TokenError> {
        let mut text = String::new();
        fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)
            .and_then(|mut f| f.read_to_string(&mut text))
            .map_err(|source| TokenError::Io {
                path: path.to_owned(),
                source,
            })?;
        let t = text.trim();
        if t.len() != 2 * TOKEN_BYTES || !t.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(TokenError::Malformed {
                path: path.to_owned(),
            });
        }
        Ok(Token(t.to_owned()))
    }

    /// Whether `presented` is this token, in time that does not depend on where they differ.
    pub fn matches(&self, presented: &str) -> bool {
        use subtle::ConstantTimeEq as _;
        self.0.len() == presented.len() && bool::from(self.0.as_bytes().ct_eq(presented.as_bytes()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A token file must be a regular file of the agent's own user that nobody else can read.
fn check_private(path: &Path, meta: &fs::Metadata) -> Result<(), TokenError> {
    let unsafe_ = |what: String| TokenError::Unsafe {
        path: path.to_owned(),
        what,
    };
    if !meta.file_type().is_file() {
        return Err(unsafe_("not a regular file (a symlink or other)".into()));
    }
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != me {
        return Err(unsafe_(format!("owned by uid {}, not {me}", meta.uid())));
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(unsafe_(format!(
            "readable or writable by others (mode {mode:04o})"
        )));
    }
    Ok(())
}

impl Token {
    /// The token for a client, from `path`; the error says what is wrong with the file in
    /// words a user can act on.
    pub fn read_for_client(path: &Path) -> Result<String, TokenError> {
        Token::read(path).map(|t| t.0).map_err(|e| match e {
            TokenError::Io { path, source } => {
                let what = match source.kind() {
                    io::ErrorKind::NotFound => {
                        "does not exist: is this the agent's api.token_file? (it is created when \
                         the agent first starts)"
                            .to_owned()
                    }
                    io::ErrorKind::PermissionDenied => {
                        "cannot be read by this user: it is root's; run the command as root"
                            .to_owned()
                    }
                    _ => source.to_string(),
                };
                TokenError::Unreadable { path, what }
            }
            other => other,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_once_private_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/token");
        let t = Token::load_or_create(&path).unwrap();
        assert_eq!(t.as_str().len(), 64);
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let again = Token::load_or_create(&path).unwrap();
        assert_eq!(t.as_str(), again.as_str());
        assert!(t.matches(again.as_str()));
        assert!(!t.matches(&"0".repeat(64)));
        assert!(!t.matches(""));
        assert_eq!(Token::read_for_client(&path).unwrap(), t.as_str());
        let missing = Token::read_for_client(&dir.path().join("nope")).unwrap_err();
        assert!(missing.to_string().contains("does not exist"), "{missing}");
    }

    #[test]
    fn loose_modes_symlinks_and_garbage_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        Token::load_or_create(&path).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let e = Token::load_or_create(&path).unwrap_err().to_string();
        assert!(e.contains("mode 0644") && e.contains("leaked"), "{e}");

        let victim = dir.path().join("victim");
        fs::write(&victim, "x").unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&victim, &link).unwrap();
        let e = Token::load_or_create(&link).unwrap_err().to_string();
        assert!(e.contains("not a regular file"), "{e}");
        assert_eq!(fs::read_to_string(&victim).unwrap(), "x");

        let bad = dir.path().join("bad");
        fs::write(&bad, "short\n").unwrap();
        fs::set_permissions(&bad, fs::Permissions::from_mode(0o600)).unwrap();
        let e = Token::load_or_create(&bad).unwrap_err().to_string();
        assert!(e.contains("64 hex"), "{e}");
    }
}
