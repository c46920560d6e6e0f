//! A tiny wrapper around [`std::process::Command`] that logs what it runs and
//! turns failures into readable `anyhow` errors.

use std::{
    ffi::{OsStr, OsString},
    fmt,
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Stdio},
};

use anyhow::{bail, Context, Result};

/// A command to run, with a printable form for logs and error messages.
pub struct Cmd {
    inner: Command,
    program: OsString,
    args: Vec<OsString>,
    envs: Vec<(OsString, OsString)>,
}

impl Cmd {
    pub fn new(program: impl AsRef<OsStr>) -> Self {
        let program = program.as_ref().to_os_string();
        Self {
            inner: Command::new(&program),
            program,
            args: Vec::new(),
            envs: Vec::new(),
        }
    }

    /// Like [`Cmd::new`], but shown as `shown` in logs (e.g. `cargo` for the
    /// full path of the running cargo).
    pub fn named(program: impl AsRef<OsStr>, shown: &str) -> Self {
        let mut cmd = Self::new(program);
        cmd.program = shown.into();
        cmd
    }

    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        self.inner.arg(arg.as_ref());
        self.args.push(arg.as_ref().to_os_string());
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        for arg in args {
            self = self.arg(arg);
        }
        self
    }

    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Self {
        self.inner.env(key.as_ref(), value.as_ref());
        self.envs
            .push((key.as_ref().to_os_string(), value.as_ref().to_os_string()));
        self
    }

    pub fn current_dir(mut self, dir: impl AsRef<Path>) -> Self {
        self.inner.current_dir(dir);
        self
    }

    /// Prints the command line (with `prefix`) before it runs.
    pub fn log(self, prefix: &str) -> Self {
        println!("{prefix}: $ {self}");
        flush_stdout();
        self
    }

    /// Runs the command with inherited stdio and fails on a non-zero exit.
    pub fn run(mut self) -> Result<()> {
        let status = self.wait_status()?;
        if !status.success() {
            bail!("`{self}` failed ({})", describe(status));
        }
        Ok(())
    }

    /// Runs the command with inherited stdio and returns its exit status.
    pub fn status(mut self) -> Result<ExitStatus> {
        self.wait_status()
    }

    fn wait_status(&mut self) -> Result<ExitStatus> {
        flush_stdout();
        self.inner
            .status()
            .with_context(|| format!("could not start `{self}`"))
    }

    /// Runs the command, captures stdout (stderr is captured too and shown
    /// on failure) and returns stdout as a string. Fails on a non-zero exit.
    pub fn read(mut self) -> Result<String> {
        let output = self
            .inner
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("could not start `{self}`"))?;
        if !output.status.success() {
            let stderr = String::from_utf8_lossy(&output.stderr);
            let stderr = stderr.trim_end();
            if stderr.is_empty() {
                bail!("`{self}` failed ({})", describe(output.status));
            }
            bail!("`{self}` failed ({}):\n{stderr}", describe(output.status));
        }
        String::from_utf8(output.stdout)
            .with_context(|| format!("`{self}` printed output that is not UTF-8"))
    }

    /// Like [`Cmd::read`] but returns `None` instead of an error when the
    /// program cannot be started or exits non-zero. For probes.
    pub fn probe(self) -> Option<String> {
        self.read().ok()
    }

    /// Runs the command with stderr inherited and stdout both echoed to our
    /// stdout (line by line) and collected. Returns the exit status and the
    /// collected stdout.
    pub fn tee(mut self) -> Result<(ExitStatus, String)> {
        flush_stdout();
        let mut child = self
            .inner
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("could not start `{self}`"))?;
        let mut collected = String::new();
        if let Some(stdout) = child.stdout.take() {
            let mut reader = BufReader::new(stdout);
            let mut line = Vec::new();
            let out = std::io::stdout();
            loop {
                line.clear();
                let n = reader
                    .read_until(b'\n', &mut line)
                    .with_context(|| format!("reading the output of `{self}`"))?;
                if n == 0 {
                    break;
                }
                let mut lock = out.lock();
                // Echo failures (e.g. a closed pipe) must not abort the run.
                let _ = lock.write_all(&line);
                let _ = lock.flush();
                collected.push_str(&String::from_utf8_lossy(&line));
            }
        }
        let status = child
            .wait()
            .with_context(|| format!("waiting for `{self}`"))?;
        Ok((status, collected))
    }

    /// Replaces the current process with this command (Unix `exec`). Only
    /// returns on failure.
    pub fn exec(mut self) -> anyhow::Error {
        use std::os::unix::process::CommandExt;
        flush_stdout();
        let err = self.inner.exec();
        anyhow::Error::new(err).context(format!("could not execute `{self}`"))
    }
}

impl fmt::Display for Cmd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (k, v) in &self.envs {
            write!(f, "{}={} ", k.to_string_lossy(), quote(v))?;
        }
        write!(f, "{}", quote(&self.program))?;
        for arg in &self.args {
            write!(f, " {}", quote(arg))?;
        }
        Ok(())
    }
}

fn quote(s: &OsStr) -> String {
    let s = s.to_string_lossy();
    let plain = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:+,@%".contains(c));
    if plain {
        s.into_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// Human-readable description of an exit status.
pub fn describe(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(sig)) => format!("killed by signal {sig}"),
        (None, None) => "unknown exit status".to_string(),
    }
}

/// Exit code to pass through for a child's status (128 + signal when killed).
pub fn exit_code(status: ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => code,
        (None, Some(sig)) => 128 + sig,
        (None, None) => 1,
    }
}

/// Looks `program` up in `PATH`, like `which`.
pub fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

pub fn flush_stdout() {
    let _ = std::io::stdout().flush();
}

/// True when running with effective uid 0.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}
