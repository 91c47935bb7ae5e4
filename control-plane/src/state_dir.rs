//! The state directory on disk: created 0700, files written atomically.
//!
//! An existing directory readable or writable by group or others is refused
//! with an error (never silently tightened: the operator should learn that
//! the CA key sat in an open directory). Files are written to a temporary
//! name in the same directory, synced, then renamed into place, so a crash
//! never leaves a half-written file; secret files are created 0600 from the
//! first byte. This module never decides what goes into the files.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::escape::shown;

#[derive(Debug, thiserror::Error)]
pub enum StateDirError {
    #[error(
        "state dir {}: {}",
        shown(path),
        trellis_core::io_error::IoWords(source)
    )]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "state dir {} is accessible by group or others (mode {mode:o}); run `chmod 700` on it",
        shown(path)
    )]
    OpenPermissions { path: PathBuf, mode: u32 },
    #[error("state dir {} exists and is not a directory", shown(.0))]
    NotADirectory(PathBuf),
    #[error(
        "{} holds a private key but is accessible by group or others (mode {mode:o}); run \
         `chmod 600` on it (and consider whether it leaked)",
        shown(path)
    )]
    OpenSecret { path: PathBuf, mode: u32 },
}

/// Whether a file holds a secret (0600) or public material (0644).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Secrecy {
    Secret,
    Public,
}

#[derive(Clone, Debug)]
pub struct StateDir {
    root: PathBuf,
}

impl StateDir {
    /// Creates the directory 0700 if missing; refuses an existing one that
    /// group or others can access.
    pub fn open(root: &Path) -> Result<Self, StateDirError> {
        let io = |source| StateDirError::Io {
            path: root.to_path_buf(),
            source,
        };
        match fs::metadata(root) {
            Ok(meta) if !meta.is_dir() => {
                return Err(StateDirError::NotADirectory(root.to_path_buf()));
            }
            Ok(meta) => {
                let mode = meta.permissions().mode() & 0o777;
                if mode & 0o077 != 0 {
                    return Err(StateDirError::OpenPermissions {
                        path: root.to_path_buf(),
                        mode,
                    });
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(root)
                    .map_err(io)?;
                // The umask may have narrowed the mode further, never widened it.
            }
            Err(e) => return Err(io(e)),
        }
        Ok(Self {
            root: root.to_path_buf(),
        })
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Reads a file; `Ok(None)` when it does not exist.
    pub fn read(&self, name: &str) -> Result<Option<Vec<u8>>, StateDirError> {
        let path = self.path(name);
        match fs::read(&path) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(StateDirError::Io { path, source }),
        }
    }

    /// [`read`](Self::read) for a file that holds a private key: one that
    /// group or others may access is refused, never silently tightened,
    /// as the directory is.
    pub fn read_secret(&self, name: &str) -> Result<Option<Vec<u8>>, StateDirError> {
        let path = self.path(name);
        let file = match fs::File::open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(StateDirError::Io { path, source }),
        };
        let io = |source| StateDirError::Io {
            path: path.clone(),
            source,
        };
        // The mode of the file read, not of whatever the name points to later.
        let mode = file.metadata().map_err(io)?.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(StateDirError::OpenSecret { path, mode });
        }
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut &file, &mut bytes).map_err(io)?;
        Ok(Some(bytes))
    }

    /// Replaces `name` atomically with `contents`.
    pub fn write_atomic(
        &self,
        name: &str,
        contents: &[u8],
        secrecy: Secrecy,
    ) -> Result<(), StateDirError> {
        write_atomic(&self.path(name), contents, secrecy)
    }

    /// Writes `name` only when its contents differ, so a restart changes nothing.
    pub fn write_if_changed(
        &self,
        name: &str,
        contents: &[u8],
        secrecy: Secrecy,
    ) -> Result<(), StateDirError> {
        if self.read(name)?.as_deref() == Some(contents) {
            return Ok(());
        }
        self.write_atomic(name, contents, secrecy)
    }
}

/// Writes `path` through a temporary file in the same directory and a rename.
pub fn write_atomic(path: &Path, contents: &[u8], secrecy: Secrecy) -> Result<(), StateDirError> {
    let io = |source| StateDirError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mode = match secrecy {
        Secrecy::Secret => 0o600,
        Secrecy::Public => 0o644,
    };
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{file_name}.tmp-{}", std::process::id()));
    // A leftover from a crash of an earlier process with the same pid.
    let _ = fs::remove_file(&tmp);
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        file.write_all(contents)?;
        file.sync_all()?;
        fs::rename(&tmp, path)?;
        if let Some(dir) = path.parent() {
            fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_dir_0700_and_secret_files_0600() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("state");
        let dir = StateDir::open(&root).unwrap();
        let mode = fs::metadata(&root).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        dir.write_atomic("k", b"secret", Secrecy::Secret).unwrap();
        let mode = fs::metadata(dir.path("k")).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(dir.read("k").unwrap().unwrap(), b"secret");
        assert_eq!(dir.read("missing").unwrap(), None);
    }

    #[test]
    fn refuses_a_secret_file_open_to_others_and_leaves_it_alone() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = StateDir::open(&tmp.path().join("state")).unwrap();
        dir.write_atomic("k", b"secret", Secrecy::Secret).unwrap();
        assert_eq!(dir.read_secret("k").unwrap().unwrap(), b"secret");
        assert_eq!(dir.read_secret("missing").unwrap(), None);
        for mode in [0o644, 0o640, 0o604, 0o660] {
            fs::set_permissions(dir.path("k"), fs::Permissions::from_mode(mode)).unwrap();
            let err = dir.read_secret("k").unwrap_err().to_string();
            let says = format!(
                "{} holds a private key but is accessible by group or others (mode {mode:o}); \
                 run `chmod 600` on it",
                dir.path("k").display()
            );
            assert!(err.starts_with(&says), "{err}");
            assert!(!err.contains("secret"), "no key material in {err}");
            let left = fs::metadata(dir.path("k")).unwrap().permissions().mode() & 0o777;
            assert_eq!(left, mode, "the mode is the operator's to fix");
        }
    }

    #[test]
    fn refuses_a_dir_open_to_others() {
        let tmp = tempfile::tempdir().unwrap();
        fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o755)).unwrap();
        let err = StateDir::open(tmp.path()).unwrap_err();
        assert!(err.to_string().contains("chmod 700"), "{err}");
    }
}
