//! A chunked body's framing (RFC 9112 section 7.1), followed as its bytes
//! pass to find where it ends: the sidecar's HTTP/1.1 forwarder follows
//! request and answer bodies with it, and [`Heads`](super::Heads) the
//! request bodies of a port hyper serves, to find the next head. It holds
//! no bytes and allocates nothing: each call is given what has come.

use std::ops::Range;

/// The most bytes of chunk extensions in one chunked body, over all its
/// size lines (hyper's bound, on its path), which bounds one line's too:
/// more are refused ([`EXTENSIONS_TOO_LONG`]).
pub const CHUNK_EXTENSIONS: usize = 16 * 1024;
/// What a chunked body with more than [`CHUNK_EXTENSIONS`] bytes of
/// extensions is refused for.
pub const EXTENSIONS_TOO_LONG: &str = "chunk extensions over 16 KiB in one body";
const _: () = assert!(
    CHUNK_EXTENSIONS == 16 * 1024,
    "EXTENSIONS_TOO_LONG names the bound"
);
/// The most bytes of a chunked body's trailers.
pub const TRAILERS: usize = 16 * 1024;

/// Follows a chunked body (RFC 9112 section 7.1) as it passes, to know
/// where it ends; strict about line ends (CRLF only), so it never reads a
/// body differently from the caller.
#[derive(Debug, Default, Clone)]
pub struct Chunked {
    state: ChunkState,
    /// The size of the chunk being read.
    size: u64,
    /// Hex digits of the size read so far.
    digits: u8,
    /// Bytes of the trailer section.
    line: usize,
    /// Bytes of chunk extensions in the body so far.
    extensions: usize,
    /// Payload bytes passed since last asked.
    payload: usize,
    /// Whether a size line had whitespace after its digits, or the body
    /// trailers ([`regular`](Chunked::regular)).
    irregular: bool,
}

#[derive(Debug, Default, Clone, Copy, PartialEq)]
enum ChunkState {
    #[default]
    Size,
    Extension,
    SizeLf,
    Data,
    DataCr,
    DataLf,
    TrailerStart,
    Trailer,
    TrailerLf,
    EndLf,
    Done,
}

impl Chunked {
    /// Whether the body so far is framed as every reader of it reads it
    /// alike: no whitespace after a size's digits, which some readers take
    /// only before `;` or the line's end, and no trailers, which some
    /// parse as header fields and bound in number. Its end is then where
    /// hyper's server finds it too.
    pub fn regular(&self) -> bool {
        !self.irregular
    }

    /// The payload bytes (chunk data, without its framing) passed since
    /// last asked.
    pub fn take_payload(&mut self) -> usize {
        std::mem::take(&mut self.payload)
    }

    /// How many bytes of `data` belong to the body, and whether it ends
    /// with them.
    pub fn take(&mut self, data: &[u8]) -> Result<(usize, bool), &'static str> {
        self.take_each(data, |_| {})
    }

    /// As [`take`](Self::take), giving `payload` each range of `data`
    /// that is chunk data, in order.
    pub fn take_each(
        &mut self,
        data: &[u8],
        mut payload: impl FnMut(Range<usize>),
    ) -> Result<(usize, bool), &'static str> {
        use ChunkState::*;
        if self.state == Done {
            return Ok((0, true));
        }
        let mut at = 0;
        while at < data.len() {
            if self.state == Data {
                let take = (self.size).min((data.len() - at) as u64) as usize;
                payload(at..at + take);
                at += take;
                self.payload += take;
                self.size -= take as u64;
                if self.size == 0 {
                    self.state = DataCr;
                }
                continue;
            }
            let b = data[at];
            at += 1;
            self.state = match (self.state, b) {
                (Size, b) if b.is_ascii_hexdigit() => {
                    if self.digits == 16 {
                        return Err("chunk size too large");
                    }
                    self.digits += 1;
                    let digit = (b as char).to_digit(16).unwrap_or(0);
                    self.size = self.size << 4 | u64::from(digit);
                    Size
                }
                (Size, b'\r') if self.digits > 0 => SizeLf,
                (Size, _) if self.digits == 0 => return Err("invalid chunk size"),
                (Extension, b'\r') => SizeLf,
                (Extension, b'\n') => return Err("bare LF in a chunk extension"),
                // Every byte of a size line after its digits, the `;`
                // among them, counts towards the body's bound.
                (Size, b';' | b' ' | b'\t') | (Extension, _) => {
                    self.irregular |= self.state == Size && b != b';';
                    self.extensions += 1;
                    if self.extensions > CHUNK_EXTENSIONS {
                        return Err(EXTENSIONS_TOO_LONG);
                    }
                    Extension
                }
                (Size, _) => return Err("invalid chunk size"),
                (SizeLf, b'\n') => {
                    self.digits = 0;
                    if self.size == 0 {
                        self.line = 0;
                        TrailerStart
                    } else {
                        Data
                    }
                }
                (SizeLf, _) => return Err("chunk size line not ended by CRLF"),
                (DataCr, b'\r') => DataLf,
                (DataLf, b'\n') => Size,
                (DataCr | DataLf, _) => return Err("chunk data not followed by CRLF"),
                (TrailerStart, b'\r') => EndLf,
                (TrailerStart | Trailer, b'\n') => return Err("bare LF in trailers"),
                (TrailerStart | Trailer, b) => {
                    self.irregular = true;
                    self.line += 1;
                    if self.line > TRAILERS {
                        return Err("trailers too long");
                    }
                    if b == b'\r' { TrailerLf } else { Trailer }
                }
                (TrailerLf, b'\n') => TrailerStart,
                (TrailerLf, _) => return Err("trailer not ended by CRLF"),
                (EndLf, b'\n') => {
                    self.state = Done;
                    return Ok((at, true));
                }
                (EndLf, _) => return Err("chunked body not ended by CRLF"),
                (Data | Done, _) => unreachable!("handled above"),
            };
        }
        Ok((at, self.state == Done))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chunked_body_ends_where_its_last_chunk_and_trailers_do() {
        let body = b"5;a=b\r\nhello\r\n0\r\nX-T: 1\r\n\r\nNEXT";
        let mut whole = Chunked::default();
        assert_eq!(whole.take(body), Ok((body.len() - 4, true)));
        assert_eq!(whole.payload, 5);
        // The same, a byte at a time.
        let mut bytewise = Chunked::default();
        let mut ended = None;
        for (at, b) in body.iter().enumerate() {
            if let (1, true) = bytewise.take(std::slice::from_ref(b)).unwrap() {
                ended = Some(at + 1);
                break;
            }
        }
        assert_eq!(ended, Some(body.len() - 4));
        for bad in [
            &b"5\nhello\r\n0\r\n\r\n"[..],
            b"5\r\nhelloX\r\n",
            b"x\r\n",
            b"11111111111111111\r\n",
            b"0\r\nX-T: 1\n\r\n",
        ] {
            assert!(
                Chunked::default().take(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn whitespace_after_a_size_or_trailers_make_a_body_irregular() {
        let regular = |body: &[u8]| {
            let mut chunked = Chunked::default();
            assert_eq!(chunked.take(body), Ok((body.len(), true)));
            chunked.regular()
        };
        assert!(regular(b"5;a=b c\r\nhello\r\n0\r\n\r\n"));
        assert!(!regular(b"5 ;a\r\nhello\r\n0\r\n\r\n"));
        assert!(!regular(b"5\r\nhello\r\n0\t\r\n\r\n"));
        assert!(!regular(b"0\r\nx: y\r\n\r\n"));
    }

    /// A chunked body with `n` one-byte chunks, each with `ext` bytes of
    /// extension (`;` and a name).
    fn extended_chunks(n: usize, ext: usize) -> String {
        let chunk = format!("1;{}\r\nx\r\n", "e".repeat(ext - 1));
        format!("{}0\r\n\r\n", chunk.repeat(n))
    }

    /// Chunk extensions are bounded over a whole body, as hyper bounds
    /// them: 16 KiB on one size line or over many pass, a byte more in
    /// all is refused.
    #[test]
    fn chunk_extensions_are_bounded_over_a_whole_body() {
        for body in [extended_chunks(1, 16 * 1024), extended_chunks(16, 1024)] {
            assert_eq!(
                Chunked::default().take(body.as_bytes()),
                Ok((body.len(), true))
            );
        }
        let mut over = extended_chunks(16, 1024);
        over.insert(1, ';');
        assert_eq!(
            Chunked::default().take(over.as_bytes()),
            Err(EXTENSIONS_TOO_LONG)
        );
    }
}
