//! The state directory on disk: created 0700, files written atomically.
//!
//! An existing directory readable or writable by others, or by a group, is
//! refused with an error (never silently tightened: the operator should
//! learn that the CA key sat in an open directory). The one exception is
//! the shape Kubernetes' `fsGroup` gives a volume at each mount: a setgid
//! directory of a group the process runs with (its members are then the
//! pod's own processes); the key files in it may then be open to that same
//! group, and only to it, and the start says so in a warning, as every
//! process of that group can read the CA key. A directory owned by
//! another user is refused, naming both users: a root process included,
//! as that user could replace the CA key it would sign with. Files are written to a temporary name in the same directory,
//! synced, then renamed into place, so a crash never leaves a half-written
//! file (a start removes what a crash left: [`StateDir::remove_stale_temp_files`]);
//! secret files are created 0600 from the first byte. This module never
//! decides what goes into the files.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
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
        "state dir {} is owned by uid {owner}, not by uid {uid} the control plane runs as (its \
         owner could read or replace the CA key there); run `chown -R {uid} {}` on it, or run \
         the control plane as uid {owner}",
        shown(path),
        shown(path)
    )]
    NotOwner { path: PathBuf, owner: u32, uid: u32 },
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
    /// The group the directory and its key files may be open to: set only
    /// where the directory is setgid and of a group this process runs with,
    /// as Kubernetes' `fsGroup` leaves a volume.
    group: Option<u32>,
}

impl StateDir {
    /// Creates the directory 0700 if missing; refuses an existing one that
    /// others can access, or a group unless in the shape `fsGroup` gives (a
    /// setgid directory of a group this process runs with: warned of), or
    /// that another user owns (when this process is root too).
    pub fn open(root: &Path) -> Result<Self, StateDirError> {
        let io = |source| StateDirError::Io {
            path: root.to_path_buf(),
            source,
        };
        let mut group = None;
        match fs::metadata(root) {
            Ok(meta) if !meta.is_dir() => {
                return Err(StateDirError::NotADirectory(root.to_path_buf()));
            }
            Ok(meta) => {
                group = check_dir(root, &meta, ProcessIds::of_this_process().as_ref())?;
                if let Some(gid) = group {
                    tracing::warn!(
                        state_dir = %shown(root),
                        mode = format_args!("{:o}", meta.permissions().mode() & 0o7777),
                        "the state dir and its key files are open to group {gid}, which the \
                         control plane runs with (a setgid directory, as Kubernetes' fsGroup \
                         leaves a volume): every process running with that group can read the \
                         CA key and replace the state dir's files"
                    );
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
            group,
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
    /// others, or a group, may access is refused, never silently tightened,
    /// as the directory is; except the group the directory itself was
    /// accepted for (`fsGroup`'s, see [`open`](Self::open)).
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
        let meta = file.metadata().map_err(io)?;
        if !private_to(&meta, self.group) {
            let mode = meta.permissions().mode() & 0o777;
            return Err(StateDirError::OpenSecret { path, mode });
        }
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut &file, &mut bytes).map_err(io)?;
        Ok(Some(bytes))
    }

    /// Removes the temporary files that writes of an earlier process left
    /// here when it was killed between creating one and renaming it into
    /// place: each is named `.NAME.tmp-PID` after the file it was to
    /// replace. Only names of that exact pattern, for one of `names`,
    /// regular files, are removed: this process's pid included, as a
    /// container's process has the same pid (1) at every restart. Call it
    /// only before this process writes here, and while holding what keeps
    /// other processes off this directory (the database's lock, or
    /// [`try_lock`](Self::try_lock)): a live one's temporary file would go
    /// too. Returns the names removed.
    pub fn remove_stale_temp_files(&self, names: &[&str]) -> Result<Vec<String>, StateDirError> {
        let io = |source| StateDirError::Io {
            path: self.root.clone(),
            source,
        };
        let mut removed = Vec::new();
        for entry in fs::read_dir(&self.root).map_err(io)? {
            let entry = entry.map_err(io)?;
            let file_name = entry.file_name();
            let Some(file_name) = file_name.to_str() else {
                continue;
            };
            let Some(pid) = names.iter().find_map(|name| {
                file_name
                    .strip_prefix('.')?
                    .strip_prefix(name)?
                    .strip_prefix(".tmp-")
            }) else {
                continue;
            };
            if pid.is_empty() || !pid.bytes().all(|b| b.is_ascii_digit()) {
                continue;
            }
            if !entry.file_type().map_err(io)?.is_file() {
                continue;
            }
            match fs::remove_file(entry.path()) {
                Ok(()) => removed.push(file_name.to_owned()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(StateDirError::Io {
                        path: entry.path(),
                        source,
                    });
                }
            }
        }
        Ok(removed)
    }

    /// Takes an advisory lock (`flock`) on the directory, held for as long
    /// as the [`DirLock::Held`] file lives: what tells a start that no
    /// other control plane writes in the directory, whichever store each
    /// uses (the embedded database's own lock covers its file only).
    pub fn try_lock(&self) -> Result<DirLock, StateDirError> {
        let io = |source| StateDirError::Io {
            path: self.root.clone(),
            source,
        };
        let dir = fs::File::open(&self.root).map_err(io)?;
        match dir.try_lock() {
            Ok(()) => Ok(DirLock::Held(dir)),
            Err(fs::TryLockError::WouldBlock) => Ok(DirLock::HeldElsewhere),
            Err(fs::TryLockError::Error(e)) if locks_unsupported(&e) => Ok(DirLock::Unsupported(e)),
            Err(fs::TryLockError::Error(e)) => Err(io(e)),
        }
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

/// What [`StateDir::try_lock`] found.
#[derive(Debug)]
pub enum DirLock {
    /// The lock, held until this file is dropped.
    Held(fs::File),
    /// Another process holds it.
    HeldElsewhere,
    /// The directory's file system takes no locks (an NFS mount without
    /// its lock service, some FUSE or SMB mounts): nothing is known of
    /// other processes, and the start goes on without the lock.
    Unsupported(std::io::Error),
}

/// Whether `e`, from `flock`, says the file system takes no locks rather
/// than that taking this one failed.
fn locks_unsupported(e: &std::io::Error) -> bool {
    // ENOLCK: an NFS mount whose server runs no lock manager; ENOTSUP
    // (EOPNOTSUPP on Linux) and ENOSYS: a file system with no flock.
    const ENOSYS: i32 = 38;
    const ENOLCK: i32 = 37;
    const EOPNOTSUPP: i32 = 95;
    e.kind() == std::io::ErrorKind::Unsupported
        || matches!(e.raw_os_error(), Some(ENOLCK | ENOSYS | EOPNOTSUPP))
}

/// The ids this process acts with on files, from `/proc/self/status`.
#[derive(Debug)]
struct ProcessIds {
    uid: u32,
    /// The effective group and the supplementary groups.
    groups: Vec<u32>,
}

impl ProcessIds {
    /// `None` where `/proc` cannot tell: group access is then refused.
    fn of_this_process() -> Option<Self> {
        let mut ids = Self::parse(&fs::read_to_string("/proc/self/status").ok()?)?;
        let uid_map = fs::read_to_string("/proc/self/uid_map").ok();
        let overflow = fs::read_to_string("/proc/sys/kernel/overflowgid").ok();
        ids.drop_the_unmapped_group(uid_map.as_deref(), overflow.as_deref());
        Some(ids)
    }

    /// In a user namespace a file's group that is not mapped into it shows
    /// as the overflow gid (`nogroup`, 65534 unless the kernel says
    /// otherwise): a process running with that gid must not take such a
    /// file as open to its own group, as the real group is someone else's.
    /// Where `uid_map` is unknown this process is taken to be in one.
    fn drop_the_unmapped_group(&mut self, uid_map: Option<&str>, overflowgid: Option<&str>) {
        let initial =
            uid_map.is_some_and(|map| map.split_whitespace().eq(["0", "0", "4294967295"]));
        if initial {
            return;
        }
        let overflow = overflowgid
            .and_then(|gid| gid.trim().parse().ok())
            .unwrap_or(65534);
        self.groups.retain(|&gid| gid != overflow);
    }

    fn parse(status: &str) -> Option<Self> {
        let field = |name: &str| {
            status
                .lines()
                .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
                .map(|rest| rest.split_whitespace().map(str::parse::<u32>))
        };
        // Real, effective, saved, filesystem: the effective one decides.
        let uid = field("Uid")?.nth(1)?.ok()?;
        let gid = field("Gid")?.nth(1)?.ok()?;
        let mut groups = vec![gid];
        for group in field("Groups")? {
            groups.push(group.ok()?);
        }
        Some(Self { uid, groups })
    }
}

/// Refuses an existing state dir owned by another user (a root process
/// too: that user could replace its CA key) or open to others, or to a
/// group except in the shape Kubernetes' `fsGroup` gives a volume: the
/// directory setgid, of a group this process runs with. Returns that group
/// where the directory is open to it. Where the process's ids are unknown,
/// group access is refused.
fn check_dir(
    root: &Path,
    meta: &fs::Metadata,
    ids: Option<&ProcessIds>,
) -> Result<Option<u32>, StateDirError> {
    if let Some(ids) = ids
        && meta.uid() != ids.uid
    {
        return Err(StateDirError::NotOwner {
            path: root.to_path_buf(),
            owner: meta.uid(),
            uid: ids.uid,
        });
    }
    let mode = meta.permissions().mode();
    // A plain `chmod 770` (no setgid) is not what the kubelet makes, and on
    // a host the group is often a shared one (`users`).
    let fs_group = mode & 0o2000 != 0 && ids.is_some_and(|ids| ids.groups.contains(&meta.gid()));
    let group = fs_group.then_some(meta.gid());
    if !private_to(meta, group) {
        return Err(StateDirError::OpenPermissions {
            path: root.to_path_buf(),
            mode: mode & 0o777,
        });
    }
    Ok(group.filter(|_| mode & 0o070 != 0))
}

/// Whether only the owner, and `group` if any, may access the file or
/// directory: nothing for others, group access only for that group.
fn private_to(meta: &fs::Metadata, group: Option<u32>) -> bool {
    let mode = meta.permissions().mode();
    mode & 0o007 == 0 && (mode & 0o070 == 0 || group == Some(meta.gid()))
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

    /// A group no process of the tests runs with.
    fn foreign_group() -> u32 {
        let ids = ProcessIds::of_this_process().unwrap();
        (60_000..).find(|gid| !ids.groups.contains(gid)).unwrap()
    }

    /// Gives `path` to `gid`; `false` (the test skipped, failed under CI)
    /// where this process may not (it is not root).
    fn chgrp(path: &Path, gid: u32) -> bool {
        match std::os::unix::fs::chown(path, None, Some(gid)) {
            Ok(()) => true,
            Err(e) if std::env::var_os("CI").is_none() => {
                eprintln!("skipped: giving a file another group needs root: {e}");
                false
            }
            Err(e) => panic!("giving a file another group needs root: {e}"),
        }
    }

    #[test]
    fn refuses_a_secret_file_open_to_others_and_leaves_it_alone() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = StateDir::open(&tmp.path().join("state")).unwrap();
        dir.write_atomic("k", b"secret", Secrecy::Secret).unwrap();
        assert_eq!(dir.read_secret("k").unwrap().unwrap(), b"secret");
        assert_eq!(dir.read_secret("missing").unwrap(), None);
        if !chgrp(&dir.path("k"), foreign_group()) {
            return;
        }
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

    /// What the kubelet makes of a volume with `fsGroup` at each mount: the
    /// directory 2770 and every file 0660, all of the pod's group, which the
    /// control plane runs with. Accepted; others' access still is not, nor
    /// the same group's without the setgid bit (a host's `chmod 770`), nor
    /// a key file open to its group in a directory that is not.
    #[test]
    fn accepts_access_by_a_group_of_this_process_as_fs_group_gives_it() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("state");
        let dir = StateDir::open(&root).unwrap();
        dir.write_atomic("k", b"secret", Secrecy::Secret).unwrap();
        let own = fs::metadata(&root).unwrap().gid();
        let ids = ProcessIds::of_this_process().unwrap();
        assert!(ids.groups.contains(&own), "{ids:?} {own}");
        // A key file open to the group in a directory closed to it.
        fs::set_permissions(dir.path("k"), fs::Permissions::from_mode(0o640)).unwrap();
        let err = dir.read_secret("k").unwrap_err().to_string();
        assert!(err.contains("(mode 640); run `chmod 600`"), "{err}");
        // Open to the group without the setgid bit fsGroup sets.
        fs::set_permissions(&root, fs::Permissions::from_mode(0o770)).unwrap();
        let err = StateDir::open(&root).unwrap_err().to_string();
        assert!(err.contains("(mode 770); run `chmod 700`"), "{err}");
        fs::set_permissions(&root, fs::Permissions::from_mode(0o2770)).unwrap();
        fs::set_permissions(dir.path("k"), fs::Permissions::from_mode(0o660)).unwrap();
        let dir = StateDir::open(&root).unwrap();
        assert_eq!(dir.group, Some(own));
        assert_eq!(dir.read_secret("k").unwrap().unwrap(), b"secret");
        // Setgid but closed to the group: its key files must be too.
        fs::set_permissions(&root, fs::Permissions::from_mode(0o2700)).unwrap();
        let closed = StateDir::open(&root).unwrap();
        let err = closed.read_secret("k").unwrap_err().to_string();
        assert!(err.contains("(mode 660); run `chmod 600`"), "{err}");
        fs::set_permissions(&root, fs::Permissions::from_mode(0o2770)).unwrap();
        fs::set_permissions(dir.path("k"), fs::Permissions::from_mode(0o664)).unwrap();
        let err = dir.read_secret("k").unwrap_err().to_string();
        assert!(err.contains("(mode 664); run `chmod 600`"), "{err}");
        fs::set_permissions(&root, fs::Permissions::from_mode(0o2775)).unwrap();
        let err = StateDir::open(&root).unwrap_err().to_string();
        assert!(err.contains("(mode 775); run `chmod 700`"), "{err}");
        // The same modes with a group the process does not run with.
        fs::set_permissions(&root, fs::Permissions::from_mode(0o2770)).unwrap();
        if !chgrp(&root, foreign_group()) {
            return;
        }
        let err = StateDir::open(&root).unwrap_err().to_string();
        assert!(err.contains("(mode 770); run `chmod 700`"), "{err}");
        // A key file of another group than the directory's.
        fs::set_permissions(&root, fs::Permissions::from_mode(0o2770)).unwrap();
        std::os::unix::fs::chown(&root, None, Some(own)).unwrap();
        let dir = StateDir::open(&root).unwrap();
        if !chgrp(&dir.path("k"), foreign_group()) {
            return;
        }
        fs::set_permissions(dir.path("k"), fs::Permissions::from_mode(0o660)).unwrap();
        let err = dir.read_secret("k").unwrap_err().to_string();
        assert!(err.contains("(mode 660); run `chmod 600`"), "{err}");
    }

    /// The group of a setgid directory is accepted when it is the effective
    /// group or a supplementary one (`fsGroup` is supplementary unless
    /// `runAsGroup` is the same), and not without the setgid bit, nor where
    /// the process's ids are unknown.
    #[test]
    fn accepts_group_access_only_in_the_shape_fs_group_gives() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = StateDir::open(&tmp.path().join("state")).unwrap();
        let root = dir.root();
        let gid = fs::metadata(root).unwrap().gid();
        let uid = fs::metadata(root).unwrap().uid();
        let effective = ProcessIds {
            uid,
            groups: vec![gid],
        };
        let supplementary = ProcessIds {
            uid,
            groups: vec![gid.wrapping_add(1), gid],
        };
        let other = ProcessIds {
            uid,
            groups: vec![gid.wrapping_add(1)],
        };
        let check = |mode: u32, ids: Option<&ProcessIds>| {
            fs::set_permissions(root, fs::Permissions::from_mode(mode)).unwrap();
            check_dir(root, &fs::metadata(root).unwrap(), ids)
        };
        assert_eq!(check(0o2770, Some(&effective)).unwrap(), Some(gid));
        assert_eq!(check(0o2750, Some(&supplementary)).unwrap(), Some(gid));
        assert_eq!(check(0o2700, Some(&effective)).unwrap(), None);
        assert_eq!(check(0o700, None).unwrap(), None);
        for (mode, ids) in [
            (0o770, Some(&effective)),
            (0o750, Some(&supplementary)),
            (0o2770, Some(&other)),
            (0o2770, None),
            (0o2771, Some(&effective)),
        ] {
            let err = check(mode, ids).unwrap_err().to_string();
            let says = format!("(mode {:o}); run `chmod 700` on it", mode & 0o777);
            assert!(err.ends_with(&says), "{mode:o} {ids:?}: {err}");
        }
    }

    #[test]
    fn refuses_a_dir_another_user_owns_root_included() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = StateDir::open(&tmp.path().join("state")).unwrap();
        let meta = fs::metadata(dir.root()).unwrap();
        let owner = meta.uid();
        let other = ProcessIds {
            uid: owner + 1,
            groups: vec![meta.gid()],
        };
        let err = check_dir(dir.root(), &meta, Some(&other)).unwrap_err();
        let shown = dir.root().display();
        assert_eq!(
            err.to_string(),
            format!(
                "state dir {shown} is owned by uid {owner}, not by uid {} the control plane runs \
                 as (its owner could read or replace the CA key there); run `chown -R {} {shown}` \
                 on it, or run the control plane as uid {owner}",
                owner + 1,
                owner + 1
            )
        );
        let same = ProcessIds {
            uid: owner,
            groups: vec![meta.gid()],
        };
        check_dir(dir.root(), &meta, Some(&same)).unwrap();
        // Root too: the owner could replace the CA key root signs with.
        // Run as root, the test gives the directory to another user.
        let root = ProcessIds {
            uid: 0,
            groups: vec![0],
        };
        if owner == 0 {
            std::os::unix::fs::chown(dir.root(), Some(65534), None).unwrap();
        }
        let meta = fs::metadata(dir.root()).unwrap();
        assert_ne!(meta.uid(), 0);
        let err = check_dir(dir.root(), &meta, Some(&root)).unwrap_err();
        assert!(
            err.to_string().contains(&format!(
                "is owned by uid {}, not by uid 0 the control plane runs as",
                meta.uid()
            )),
            "{err}"
        );
    }

    #[test]
    fn reads_the_effective_ids_of_proc_status() {
        let status = "Name:\tx\nUid:\t1000\t65532\t65532\t65532\nGid:\t1000\t65533\t0\t0\n\
                      Groups:\t4 24 \nVmPeak:\t1 kB\n";
        let ids = ProcessIds::parse(status).unwrap();
        assert_eq!(ids.uid, 65532);
        assert_eq!(ids.groups, [65533, 4, 24]);
        let none = "Uid:\t0\t0\t0\t0\nGid:\t0\t0\t0\t0\nGroups:\t\n";
        assert_eq!(ProcessIds::parse(none).unwrap().groups, [0]);
        for unknown in [
            "Uid:\t0\t0\t0\t0\nGid:\t0\t0\t0\t0\n",
            "Uid:\t0\nGid:\t0\t0\t0\t0\nGroups:\t\n",
            "Uid:\t0\t0\t0\t0\nGid:\t0\t0\t0\t0\nGroups:\t4 x\n",
            "",
        ] {
            assert!(ProcessIds::parse(unknown).is_none(), "{unknown:?}");
        }
    }

    /// In a user namespace, the overflow gid a file of an unmapped group
    /// shows is never taken for one of the process's groups.
    #[test]
    fn drops_the_overflow_gid_in_a_user_namespace() {
        let ids = |groups: &[u32]| ProcessIds {
            uid: 1000,
            groups: groups.to_vec(),
        };
        let initial = Some("         0          0 4294967295\n");
        let mapped = Some("         0     100000      65536\n");
        let mut host = ids(&[65534, 100]);
        host.drop_the_unmapped_group(initial, Some("65534\n"));
        assert_eq!(host.groups, [65534, 100]);
        let mut pod = ids(&[65534, 100]);
        pod.drop_the_unmapped_group(mapped, Some("65534\n"));
        assert_eq!(pod.groups, [100]);
        let mut pod = ids(&[65533, 100]);
        pod.drop_the_unmapped_group(mapped, Some("65533"));
        assert_eq!(pod.groups, [100]);
        let mut unknown = ids(&[65534, 100]);
        unknown.drop_the_unmapped_group(None, None);
        assert_eq!(unknown.groups, [100]);
    }

    /// The directory's lock is one holder's at a time (a second open of
    /// it, in this process too, is refused), freed when the holder drops
    /// it; a file system that takes no locks is told from a lock that
    /// failed.
    #[test]
    fn the_lock_is_one_holders_and_no_locks_is_told_apart() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = StateDir::open(&tmp.path().join("state")).unwrap();
        let DirLock::Held(held) = dir.try_lock().unwrap() else {
            panic!("a free state dir's lock is taken");
        };
        assert!(matches!(dir.try_lock().unwrap(), DirLock::HeldElsewhere));
        drop(held);
        assert!(matches!(dir.try_lock().unwrap(), DirLock::Held(_)));
        for errno in [37, 38, 95] {
            let e = std::io::Error::from_raw_os_error(errno);
            assert!(locks_unsupported(&e), "{e}");
        }
        for errno in [5, 13] {
            let e = std::io::Error::from_raw_os_error(errno);
            assert!(!locks_unsupported(&e), "{e}");
        }
    }

    /// A start removes what writes killed before their rename left (named
    /// after the file and the pid of the process that died), and nothing
    /// else: not a name of another pattern. This process's own pid is
    /// stale too at a start (a container's process is pid 1 each time).
    #[test]
    fn removes_stale_temp_files_of_its_own_pattern_only() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = StateDir::open(&tmp.path().join("state")).unwrap();
        let own = format!(".ca.key.tmp-{}", std::process::id());
        let stale = [".ca.key.tmp-1", ".bundle.pem.tmp-4194304", own.as_str()];
        let kept = [
            ".ca.key.tmp-",
            ".ca.key.tmp-12x",
            ".other.tmp-7",
            "ca.key.tmp-7",
            "ca.key",
            ".ca.key.tmp-7.keep",
        ];
        for name in stale.iter().chain(&kept) {
            fs::write(dir.path(name), b"x").unwrap();
        }
        fs::create_dir(dir.path(".admin.key.tmp-9")).unwrap();
        // A link of the pattern to a file elsewhere: neither is removed.
        let elsewhere = tmp.path().join("elsewhere");
        fs::write(&elsewhere, b"not ours").unwrap();
        std::os::unix::fs::symlink(&elsewhere, dir.path(".ca.crt.tmp-8")).unwrap();
        let mut removed = dir
            .remove_stale_temp_files(&["ca.key", "ca.crt", "bundle.pem", "admin.key"])
            .unwrap();
        removed.sort();
        let mut expected = stale.map(str::to_owned);
        expected.sort();
        assert_eq!(removed, expected);
        for name in stale {
            assert!(!dir.path(name).exists(), "{name}");
        }
        for name in kept {
            assert!(dir.path(name).exists(), "{name}");
        }
        assert!(dir.path(".admin.key.tmp-9").is_dir());
        assert_eq!(fs::read(&elsewhere).unwrap(), b"not ours");
        assert!(fs::symlink_metadata(dir.path(".ca.crt.tmp-8")).is_ok());
    }

    #[test]
    fn refuses_a_dir_open_to_others() {
        let tmp = tempfile::tempdir().unwrap();
        fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o755)).unwrap();
        let err = StateDir::open(tmp.path()).unwrap_err();
        assert!(err.to_string().contains("chmod 700"), "{err}");
    }
}
