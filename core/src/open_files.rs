//! The process's open-files limit, raised at start-up by both binaries.
//! Every Watch stream of a sidecar is a socket held open in the control
//! plane, and every connection a sidecar proxies holds two (the caller's
//! and the upstream's), so either needs more descriptors than the soft
//! limit of 1,024 that container runtimes (containerd 2, Docker 25 and
//! later) give a container. Raising the soft limit to the hard limit needs
//! no privilege. This module never raises the hard limit.

use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};

/// The soft and hard limits after raising: what the process may now open.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OpenFiles {
    /// `None` is unlimited.
    pub soft: Option<u64>,
    pub hard: Option<u64>,
}

/// Raises the soft limit on open files to the hard limit; returns both as
/// they are afterwards (unchanged when the kernel refused).
pub fn raise_to_hard_limit() -> Result<OpenFiles, rustix::io::Errno> {
    let now = getrlimit(Resource::Nofile);
    if now.current != now.maximum {
        setrlimit(
            Resource::Nofile,
            Rlimit {
                current: now.maximum,
                maximum: now.maximum,
            },
        )?;
    }
    let after = getrlimit(Resource::Nofile);
    Ok(OpenFiles {
        soft: after.current,
        hard: after.maximum,
    })
}

/// Raises the soft limit as [`raise_to_hard_limit`] does and says so:
/// the limit now as `open_files` (a number, or `unlimited`), or, at warn,
/// why it could not be raised and `consequence`.
pub fn raise_and_log(consequence: &str) {
    const RAISED: &str = "open-files limit raised to the hard limit";
    match raise_to_hard_limit() {
        Ok(OpenFiles { soft: Some(n), .. }) => tracing::info!(open_files = n, "{RAISED}"),
        Ok(OpenFiles { soft: None, .. }) => tracing::info!(open_files = %"unlimited", "{RAISED}"),
        Err(e) => tracing::warn!(
            error = %e,
            "cannot raise the open-files limit: {consequence}"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_soft_limit_reaches_the_hard_limit() {
        let raised = raise_to_hard_limit().expect("raising to the hard limit needs no privilege");
        assert_eq!(raised.soft, raised.hard);
        assert_eq!(getrlimit(Resource::Nofile).current, raised.hard);
    }
}
