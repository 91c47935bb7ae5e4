//! `trellis-control-plane`: see [`trellis_control_plane::cli_main`].
fn main() -> std::process::ExitCode {
    trellis_control_plane::cli_main(std::env::args_os().collect())
}
