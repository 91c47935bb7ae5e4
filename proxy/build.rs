//! Link settings for the sidecar that make an idle one smaller. Most of an
//! idle sidecar's resident memory is its own executable's pages, so both aim
//! at those (the figures are in docs/BENCHMARKS.md, "Idle RSS").
//!
//! - **Packed relative relocations** (`DT_RELR`), where the C library reads
//!   them (glibc 2.36 and later). A position-independent executable carries
//!   one relocation for every pointer in its read-only data (vtables, string
//!   tables), and the loader reads all of them at start-up: 300 KB for this
//!   sidecar, resident for the life of every pod. Packed, the same
//!   relocations take 3 KB. The executable stays position-independent. A
//!   binary linked this way names the glibc version it needs
//!   (`GLIBC_ABI_DT_RELR`), so an older C library refuses it by name at
//!   start-up instead of running it.
//! - **Start-up code first** (`link/symbol-order.txt`, when the linker is
//!   LLD). The functions an idle sidecar has run (start-up, certificate,
//!   discovery, admin probes), then those a connection runs, are laid out
//!   together at the start of the code. The kernel maps code in 64 KiB
//!   windows around each page touched, so start-up touching code here and
//!   there over the whole executable made almost all of it resident (6.6 of
//!   6.9 MB); laid out together, 3.7 MB is. Symbol names carry hashes of the
//!   toolchain, the lock file and the build's settings, so the list matches
//!   only the build it was made from (`scripts/symbol-order.sh`, which says
//!   how to refresh it). Names it does not find are skipped: a stale list
//!   costs memory, never correctness, so a build whose toolchain or lock
//!   file is not the one the list's header names says so in a warning.
//!   `TRELLIS_SYMBOL_ORDER=off` leaves it out.

use std::path::Path;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=TRELLIS_SYMBOL_ORDER");
    let target_os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let target_env = std::env::var("CARGO_CFG_TARGET_ENV").unwrap_or_default();
    if target_os != "linux" || target_env != "gnu" {
        return;
    }
    println!("cargo:rustc-link-arg-bin=trellis-proxy=-Wl,-z,pack-relative-relocs");

    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let order = manifest.join("link/symbol-order.txt");
    let lock = manifest.join("../Cargo.lock");
    println!("cargo:rerun-if-changed={}", order.display());
    println!("cargo:rerun-if-changed={}", lock.display());
    let wanted = std::env::var("TRELLIS_SYMBOL_ORDER").map_or(true, |v| v != "off");
    if wanted && order.is_file() && linked_by_lld() {
        println!(
            "cargo:rustc-link-arg-bin=trellis-proxy=-Wl,--symbol-ordering-file={}",
            order.display()
        );
        println!("cargo:rustc-link-arg-bin=trellis-proxy=-Wl,--no-warn-symbol-ordering");
        for stale in stale_provenance(&order, &lock) {
            println!(
                "cargo:warning=proxy/link/symbol-order.txt was made for {stale}; an idle \
                 sidecar keeps about 3 MiB more resident until scripts/symbol-order.sh \
                 refreshes it"
            );
        }
    }
}

/// What the list's header names (`# rustc: ...`, `# Cargo.lock: sha256
/// ...`, as `scripts/symbol-order.sh` writes them) that this build is not:
/// each as "X, this build has Y". Nothing is said of what cannot be read
/// or asked (a header without the line, no `sha256sum`): the warning is a
/// help, never a failure.
fn stale_provenance(order: &Path, lock: &Path) -> Vec<String> {
    let Ok(list) = std::fs::read_to_string(order) else {
        return Vec::new();
    };
    let header = |key: &str| {
        list.lines()
            .take_while(|l| l.starts_with('#'))
            .find_map(|l| l.strip_prefix(key))
            .map(str::trim)
    };
    let mut stale = Vec::new();
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let version = Command::new(rustc)
        .arg("--version")
        .output()
        .ok()
        .filter(|out| out.status.success())
        .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_string());
    if let (Some(listed), Some(version)) = (header("# rustc:"), version)
        && listed != version
    {
        stale.push(format!("{listed}, this build has {version}"));
    }
    // coreutils' `sha256sum`, as the script uses: no hashing crate for the
    // build script to compile, and no line in the lock file of its own.
    let digest = Command::new("sha256sum")
        .arg(lock)
        .output()
        .ok()
        .filter(|out| out.status.success())
        .and_then(|out| {
            let out = String::from_utf8_lossy(&out.stdout);
            out.split_whitespace().next().map(str::to_string)
        });
    if let (Some(listed), Some(digest)) = (header("# Cargo.lock: sha256"), digest)
        && listed != digest
    {
        stale.push(format!(
            "Cargo.lock sha256 {listed}, this build has {digest}"
        ));
    }
    stale
}

/// Whether the sidecar will be linked by LLD, the one linker here that takes
/// a symbol ordering file. LLD signs what it links in `.comment`, and this
/// build script was linked by the same toolchain with the same flags when
/// the build is not a cross-build.
fn linked_by_lld() -> bool {
    let native = std::env::var("HOST").ok() == std::env::var("TARGET").ok();
    native
        && std::env::current_exe()
            .and_then(std::fs::read)
            .is_ok_and(|exe| exe.windows(12).any(|w| w == b"Linker: LLD "))
}
