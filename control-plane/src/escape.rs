//! Text that `trellis-control-plane` and `trellisctl` print but did not
//! write themselves (a path or a value the operator gave, a name from a
//! certificate, what the control plane sent), made safe for a terminal.
//! Every error or diagnostic that says such text back goes through here:
//! none may write a control character to the operator's terminal. The
//! rules are the sidecar's too, so they live in `trellis_core`.

pub use trellis_core::escape::{environment_refusal, escape_controls, escape_given, shown};
