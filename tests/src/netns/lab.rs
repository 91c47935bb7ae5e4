//! The lab ([`Lab`]): the `wire` namespace with its bridge, the working
//! directory one test's hosts share, and the veth pairs that join each
//! [`Host`] to the bridge. Owns the addresses: TEST-NET-1 and the ULA
//! prefix, never anything routable.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::ensure;

use super::capture::Capture;
use super::host::Host;
use super::namespace::Netns;
use crate::binaries::Launcher;

/// The bridge and the working directory every host of one test shares.
/// Drop it after its hosts and processes.
#[derive(Debug)]
pub struct Lab {
    wire: Netns,
    launcher: Launcher,
    path: PathBuf,
    // Logs and state, removed last (on drop) unless TRELLIS_TEST_KEEP is set.
    _dir: Option<tempfile::TempDir>,
}

/// The bridge in the `wire` namespace.
const BRIDGE: &str = "br0";

impl Lab {
    /// The `wire` namespace with its bridge up, and a working directory
    /// other UIDs can traverse (the pods' files are owned by their UIDs).
    pub fn new() -> anyhow::Result<Lab> {
        let launcher = Launcher::from_build_dir()?;
        let dir = tempfile::Builder::new()
            .prefix("trellis-netns-")
            .tempdir()?;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
        let path = dir.path().to_path_buf();
        std::fs::create_dir(path.join("logs"))?;
        let dir = if std::env::var_os("TRELLIS_TEST_KEEP").is_some() {
            let _ = dir.keep();
            None
        } else {
            Some(dir)
        };
        let wire = Netns::new("wire")?;
        wire.ip(&["link", "add", BRIDGE, "type", "bridge"])?;
        wire.ip(&["link", "set", BRIDGE, "up"])?;
        Ok(Lab {
            wire,
            launcher,
            path,
            _dir: dir,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.path
    }

    pub fn log(&self, name: &str) -> PathBuf {
        self.path.join("logs").join(format!("{name}.log"))
    }

    pub fn wire(&self) -> &Netns {
        &self.wire
    }

    pub fn launcher(&self) -> &Launcher {
        &self.launcher
    }

    /// A new host `label` on the bridge with `192.0.2.<index>/24` and, when
    /// the namespace has IPv6, `fd00:7e11::<index>/64`, on its `eth0`.
    pub fn host(&self, label: &str, index: u8) -> anyhow::Result<Host> {
        let port = format!("v-{label}");
        ensure!(port.len() <= 15, "host label {label:?} is too long");
        let netns = Netns::new(label)?;
        self.wire.ip(&[
            "link",
            "add",
            &port,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            netns.name(),
        ])?;
        self.wire
            .ip(&["link", "set", &port, "master", BRIDGE, "up"])?;
        let ipv4 = Ipv4Addr::new(192, 0, 2, index);
        netns.ip(&["addr", "add", &format!("{ipv4}/24"), "dev", "eth0"])?;
        let ipv6 = Ipv6Addr::new(0xfd00, 0x7e11, 0, 0, 0, 0, 0, u16::from(index));
        // IPv6 may be off in the kernel: the host is then IPv4 only.
        let ipv6 = netns
            .ip(&["addr", "add", &format!("{ipv6}/64"), "dev", "eth0", "nodad"])
            .is_ok()
            .then_some(ipv6);
        netns.ip(&["link", "set", "eth0", "up"])?;
        Ok(Host {
            label: label.to_string(),
            netns,
            ipv4,
            ipv6,
            dir: self.path.clone(),
        })
    }

    /// Starts recording every frame that crosses the bridge.
    pub async fn capture(&self) -> anyhow::Result<Capture> {
        Capture::start(self).await
    }
}
