//! I/O errors as the mesh's programs say them to people.
//!
//! An `io::Error` from the OS shows as `Address already in use (os error
//! 98)`: the OS's message, capitalised, then its number. The programs'
//! own errors are lower-case sentences (`--listen 127.0.0.1:15012: ...`),
//! so [`IoWords`] says the OS's message alone, lower-cased:
//! `address already in use`. A program whose stdout's reader went away
//! ([`stdout_closed`]) says nothing of it and ends with
//! [`EXIT_STDOUT_CLOSED`].

use std::fmt;
use std::io;

/// Exit code of a program when the reader of its stdout went away before
/// all was written (`trellisctl policy lint DIR | head -1`,
/// `trellis-proxy init --dry-run | head -1`): what a shell reports for a
/// command that `SIGPIPE` ended (128 + 13), as for `ls | head`. The rest
/// of stdout is dropped, stderr is still written, and no error is said.
pub const EXIT_STDOUT_CLOSED: u8 = 141;

/// Whether `e`, from writing stdout, means that its reader went away: Rust
/// ignores `SIGPIPE`, so the write fails (`print!` would panic) where a C
/// program would have been ended quietly. The program then ends with
/// [`EXIT_STDOUT_CLOSED`], saying nothing of it.
pub fn stdout_closed(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::BrokenPipe
}

/// `e` as people read it: for an error from the OS, its message without
/// the ` (os error N)` suffix and with a lower-case first letter (`no such
/// file or directory`, `permission denied`); any other error as it says
/// itself (its kind, `entity not found`, or the message it was made with).
pub struct IoWords<'a>(pub &'a io::Error);

impl fmt::Display for IoWords<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Some(code) = self.0.raw_os_error() else {
            return fmt::Display::fmt(self.0, f);
        };
        let text = self.0.to_string();
        let message = text
            .strip_suffix(&format!(" (os error {code})"))
            .unwrap_or(&text);
        let mut chars = message.chars();
        match (chars.next(), chars.clone().next()) {
            // `No such file` reads `no such file`; an acronym (`I/O
            // error`, `RPC struct is bad`) keeps its capitals.
            (Some(first), Some(second)) if first.is_uppercase() && !second.is_uppercase() => {
                write!(f, "{}{}", first.to_lowercase(), chars.as_str())
            }
            _ => f.write_str(message),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(e: &io::Error) -> String {
        IoWords(e).to_string()
    }

    #[test]
    fn an_os_error_is_its_message_without_its_number() {
        // EADDRINUSE, ENOENT and EACCES on Linux.
        let in_use = io::Error::from_raw_os_error(98);
        assert!(in_use.to_string().ends_with(" (os error 98)"), "{in_use}");
        assert_eq!(words(&in_use), "address already in use");
        assert_eq!(
            words(&io::Error::from_raw_os_error(2)),
            "no such file or directory"
        );
        assert_eq!(
            words(&io::Error::from_raw_os_error(13)),
            "permission denied"
        );
        // As std reads the file's error, with no code of its own.
        let missing = std::fs::read("/nonexistent/trellis-io-words").unwrap_err();
        assert_eq!(words(&missing), "no such file or directory");
    }

    #[test]
    fn an_error_without_an_os_code_says_what_it_says() {
        assert_eq!(
            words(&io::Error::from(io::ErrorKind::NotFound)),
            "entity not found"
        );
        assert_eq!(
            words(&io::Error::new(io::ErrorKind::InvalidData, "Bad PEM")),
            "Bad PEM"
        );
    }
}
