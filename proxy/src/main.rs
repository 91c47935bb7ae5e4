//! The `trellis-proxy` binary: everything happens in [`trellis_proxy::cli_main`].

/// Large blocks on a cache line: see [`trellis_alloc`].
#[global_allocator]
static ALLOC: trellis_alloc::LineAligned = trellis_alloc::LineAligned;

fn main() -> std::process::ExitCode {
    trellis_proxy::cli_main(std::env::args_os().collect())
}
