//! Links the sidecar with packed relative relocations (`DT_RELR`) where the
//! C library reads them (glibc 2.36 and later).
//!
//! A position-independent executable carries one relocation for every pointer
//! in its read-only data (vtables, string tables), and the loader reads all of
//! them at start-up: 300 KB for this sidecar, resident for the life of every
//! pod. Packed, the same relocations take 3 KB, so an idle sidecar is about
//! 0.3 MiB smaller (see docs/BENCHMARKS.md). The executable stays
//! position-independent. A binary linked this way names the glibc version it
//! needs (`GLIBC_ABI_DT_RELR`), so an older C library refuses it by name at
//! start-up instead of running it.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let target_os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let target_env = std::env::var("CARGO_CFG_TARGET_ENV").unwrap_or_default();
    if target_os == "linux" && target_env == "gnu" {
        println!("cargo:rustc-link-arg-bin=trellis-proxy=-Wl,-z,pack-relative-relocs");
    }
}
