//! What the machine must have for the namespace tests: root, iproute2,
//! iptables, and the programs run inside the namespaces ([`Tools`]), found
//! once per test process. Never creates or changes anything: it only looks.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use super::APP_UID;
use crate::machine::{is_root, runs};

/// The programs run inside the namespaces, found on `PATH`.
#[derive(Debug)]
pub struct Tools {
    pub setpriv: PathBuf,
    /// A python3 that [`APP_UID`] can run (a per-user install under a
    /// private home is skipped).
    pub python3: PathBuf,
    /// curl, when installed and runnable by [`APP_UID`]; python3 is the
    /// client otherwise.
    pub curl: Option<PathBuf>,
}

impl Tools {
    /// Found once per test process; the error names what is missing.
    pub fn get() -> Result<&'static Tools, String> {
        static TOOLS: OnceLock<Result<Tools, String>> = OnceLock::new();
        TOOLS
            .get_or_init(Tools::find)
            .as_ref()
            .map_err(Clone::clone)
    }

    fn find() -> Result<Tools, String> {
        let setpriv = on_path("setpriv")
            .into_iter()
            .find(|p| runs(p, &["--version"]))
            .ok_or("setpriv not installed")?;
        let by_app = |program: &str| {
            on_path(program).into_iter().find(|p| {
                Command::new(&setpriv)
                    .args(as_user_args(APP_UID))
                    .arg(p)
                    .arg("--version")
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success())
            })
        };
        let python3 = by_app("python3").ok_or("python3 not installed")?;
        let curl = by_app("curl");
        Ok(Tools {
            setpriv,
            python3,
            curl,
        })
    }
}

/// Why the namespace tests cannot run here (`skipped: ...`, for
/// [`crate::machine::skip`]), or `None` when they can.
pub fn unavailable() -> Option<String> {
    if !is_root() {
        return Some("skipped: needs root".into());
    }
    if !runs("ip", &["-V"]) {
        return Some("skipped: ip not installed".into());
    }
    let iptables = ["iptables-nft-save", "iptables-legacy-save"]
        .iter()
        .any(|p| runs(p, &["--version"]));
    if !iptables {
        return Some("skipped: iptables not installed".into());
    }
    Tools::get()
        .err()
        .map(|missing| format!("skipped: {missing}"))
}

/// Every file called `program` in the directories of `PATH`, in order.
fn on_path(program: &str) -> Vec<PathBuf> {
    let Some(path) = std::env::var_os("PATH") else {
        return Vec::new();
    };
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .filter(|p| p.is_file())
        .collect()
}

pub(super) fn as_user_args(uid: u32) -> [String; 4] {
    [
        format!("--reuid={uid}"),
        format!("--regid={uid}"),
        "--clear-groups".into(),
        "--".into(),
    ]
}
