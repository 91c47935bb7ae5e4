//! `trellisctl`: see [`trellis_control_plane::ctl::cli_main`].
fn main() -> std::process::ExitCode {
    trellis_control_plane::ctl::cli_main(std::env::args_os().collect())
}
