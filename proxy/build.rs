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
//!   costs memory, never correctness. `TRELLIS_SYMBOL_ORDER=off` leaves it
//!   out.

use std::path::Path;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=TRELLIS_SYMBOL_ORDER");
    let target_os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let target_env = std::env::var("CARGO_CFG_TARGET_ENV").unwrap_or_default();
    if target_os != "linux" || target_env != "gnu" {
        return;
    }
    println!("cargo:rustc-link-arg-bin=trellis-proxy=-Wl,-z,pack-relative-relocs");

    let order = Path::new(env!("CARGO_MANIFEST_DIR")).join("link/symbol-order.txt");
    println!("cargo:rerun-if-changed={}", order.display());
    let wanted = std::env::var("TRELLIS_SYMBOL_ORDER").map_or(true, |v| v != "off");
    if wanted && order.is_file() && linked_by_lld() {
        println!(
            "cargo:rustc-link-arg-bin=trellis-proxy=-Wl,--symbol-ordering-file={}",
            order.display()
        );
        println!("cargo:rustc-link-arg-bin=trellis-proxy=-Wl,--no-warn-symbol-ordering");
    }
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
