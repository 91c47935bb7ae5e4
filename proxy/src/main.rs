//! The `trellis-proxy` binary: everything happens in [`trellis_proxy::cli_main`].

fn main() -> std::process::ExitCode {
    trellis_proxy::cli_main(std::env::args_os().collect())
}
