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
/// The most bytes of a chunked body's trailers; when
/// [`lenient`](Chunked::lenient), hyper's bound: its trailer lines, their
/// CRLFs and the empty line ending them are fewer.
pub const TRAILERS: usize = 16 * 1024;
/// The most trailer fields of a chunked body hyper's server reads (its
/// bound on a head's fields, by default), when
/// [`lenient`](Chunked::lenient).
pub const TRAILER_FIELDS: usize = 100;

/// Follows a chunked body (RFC 9112 section 7.1) as it passes, to know
/// where it ends; strict about line ends (CRLF only), so it never reads a
/// body differently from the caller.
///
/// By default (the sidecar's forwarder) a size has at most 16 hex digits,
/// and the whitespace after one is taken as part of its extensions.
/// [`lenient`](Chunked::lenient) follows the bodies hyper's server reads
/// instead, as its decoder reads them.
#[derive(Debug, Default, Clone)]
pub struct Chunked {
    state: ChunkState,
    /// Whether the body is read as hyper's server reads it
    /// ([`Chunked::lenient`]).
    lenient: bool,
    /// The size of the chunk being read.
    size: u64,
    /// Hex digits of the size read so far (when lenient, only whether
    /// there are any: it may be zero-padded without bound).
    digits: u8,
    /// Bytes of the trailer section.
    line: usize,
    /// Trailer fields (lines) read, when lenient.
    fields: usize,
    /// Bytes of chunk extensions in the body so far.
    extensions: usize,
    /// Payload bytes passed since last asked.
    payload: usize,
}

#[derive(Debug, Default, Clone, Copy, PartialEq)]
enum ChunkState {
    #[default]
    Size,
    /// Whitespace after a size's digits (lenient only).
    SizeWhitespace,
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
    /// A follower of the chunked bodies hyper's server (hyper 1.x) reads,
    /// as its decoder reads them, so that a body ends where hyper finds its
    /// end: a size zero-padded without bound (refused once its value
    /// overflows 64 bits), spaces and tabs after a size's digits (before
    /// `;` or the line's end, never before more digits), chunk extensions
    /// bounded as hyper bounds them (fewer than 16 KiB over the body, the
    /// `;` and that whitespace not counted), and trailers within hyper's
    /// bounds (fewer than [`TRAILERS`] bytes, at most [`TRAILER_FIELDS`]
    /// lines), any bytes but a CR not before LF: hyper parses trailers as
    /// fields only once it has read them to their end, and a body it then
    /// refuses ends its reading of the connection.
    pub fn lenient() -> Self {
        Chunked {
            lenient: true,
            ..Chunked::default()
        }
    }

    /// How many bytes of chunk data come next, before any framing: none
    /// unless a chunk's data is being read.
    pub fn data_left(&self) -> u64 {
        if self.state == ChunkState::Data {
            self.size
        } else {
            0
        }
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
                    let digit = u64::from((b as char).to_digit(16).unwrap_or(0));
                    if self.lenient {
                        // Any number of digits, as long as the value fits.
                        self.digits = 1;
                        self.size = self
                            .size
                            .checked_mul(16)
                            .and_then(|size| size.checked_add(digit))
                            .ok_or("chunk size too large")?;
                        Size
                    } else {
                        if self.digits == 16 {
                            return Err("chunk size too large");
                        }
                        self.digits += 1;
                        self.size = self.size << 4 | digit;
                        Size
                    }
                }
                (Size, b'\r') if self.digits > 0 => SizeLf,
                (Size, _) if self.digits == 0 => return Err("invalid chunk size"),
                // hyper's reading: whitespace, then only more of it, `;` or
                // the line's end, none of it counted as extensions.
                (Size | SizeWhitespace, b' ' | b'\t') if self.lenient => SizeWhitespace,
                (Size | SizeWhitespace, b';') if self.lenient => Extension,
                (SizeWhitespace, b'\r') => SizeLf,
                (SizeWhitespace, _) => return Err("invalid whitespace after a chunk size"),
                (Extension, b'\r') => SizeLf,
                (Extension, b'\n') => return Err("bare LF in a chunk extension"),
                // hyper counts an extension's bytes after its `;`, and
                // refuses the body once they reach its bound.
                (Extension, _) if self.lenient => {
                    self.extensions += 1;
                    if self.extensions >= CHUNK_EXTENSIONS {
                        return Err(EXTENSIONS_TOO_LONG);
                    }
                    Extension
                }
                // Every byte of a size line after its digits, the `;`
                // among them, counts towards the body's bound.
                (Size, b';' | b' ' | b'\t') | (Extension, _) => {
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
                // hyper's reading of trailers: every byte counted towards
                // its bound, every line towards its bound on fields. What
                // it then makes of them (fields, or a refusal) does not
                // move the body's end.
                (TrailerStart, b'\r') if self.lenient => {
                    if self.fields > 0 {
                        self.trailer_byte()?;
                    }
                    EndLf
                }
                (TrailerStart | Trailer, b) if self.lenient => {
                    self.trailer_byte()?;
                    if b == b'\r' { TrailerLf } else { Trailer }
                }
                (TrailerLf, b'\n') if self.lenient => {
                    if self.fields >= TRAILER_FIELDS {
                        return Err("more than 100 trailer fields");
                    }
                    self.fields += 1;
                    self.trailer_byte()?;
                    TrailerStart
                }
                (EndLf, b'\n') if self.lenient && self.fields > 0 => {
                    self.trailer_byte()?;
                    self.state = Done;
                    return Ok((at, true));
                }
                (TrailerStart, b'\r') => EndLf,
                (TrailerStart | Trailer, b'\n') => return Err("bare LF in trailers"),
                (TrailerStart | Trailer, b) => {
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

    /// One more byte of trailers, within hyper's bound: fewer than
    /// [`TRAILERS`].
    fn trailer_byte(&mut self) -> Result<(), &'static str> {
        self.line += 1;
        if self.line >= TRAILERS {
            return Err("trailers over 16 KiB");
        }
        Ok(())
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

    /// Leniently, a body ends where hyper's decoder finds its end: sizes
    /// zero-padded while their value fits, whitespace after a size's
    /// digits, trailers within hyper's bounds, whatever their lines hold;
    /// what hyper's decoder refuses as it reads is refused.
    #[test]
    fn leniently_a_body_is_read_as_hyper_reads_it() {
        let ends = |body: &[u8]| {
            let mut chunked = Chunked::lenient();
            let mut bytewise = Chunked::lenient();
            let mut at = 0;
            for b in body {
                at += 1;
                if bytewise.take(std::slice::from_ref(b)) == Ok((1, true)) {
                    break;
                }
            }
            chunked.take(body).map(|(len, ended)| {
                assert_eq!(at, len);
                (len, ended)
            })
        };
        let padded = format!("{}5\r\nhello\r\n0\r\n\r\nNEXT", "0".repeat(40));
        for body in [
            padded.as_bytes(),
            &b"ffffffffffffffff\r\n"[..],
            b"5 \t \r\nhello\r\n0\t;a=b\r\n\r\nNEXT",
            b"0\r\nx-t: 1 2\r\nY:\r\n\r\nNEXT",
            // Lines hyper reads to their end before it parses them.
            b"0\r\nx-t : 1\r\n folded\r\n\r\nNEXT",
            b"0\r\nx-t: 1\nx: 2\r\n\r\nNEXT",
            b"0\r\n\n\r\n\r\nNEXT",
            b"0\r\nx: \xff\r\n\r\nNEXT",
        ] {
            let got = ends(body);
            let ended = body.ends_with(b"NEXT");
            let len = body.len() - if ended { 4 } else { 0 };
            assert_eq!(got, Ok((len, ended)), "{:?}", String::from_utf8_lossy(body));
        }
        let fields = |n: usize| format!("0\r\n{}\r\n", "x: y\r\n".repeat(n));
        // Trailers of 16 KiB but a byte in all, their last CRLF included.
        let big = format!("0\r\nx: {}\r\n\r\n", "a".repeat(TRAILERS - 8));
        for fine in [fields(TRAILER_FIELDS), big.clone()] {
            assert_eq!(
                Chunked::lenient().take(fine.as_bytes()),
                Ok((fine.len(), true))
            );
        }
        let bigger = big.replace("x:", "xx:");
        let many = fields(TRAILER_FIELDS + 1);
        // Extensions of 16 KiB but one over many size lines, `;`s not
        // counted; a byte more is refused.
        let lines = format!("1;{}\r\nx\r\n", "e".repeat(1023)).repeat(16);
        let extensions =
            format!("{}0\r\n\r\n", lines).replacen(';', &format!(";{}", "e".repeat(15)), 1);
        let more = extensions.replacen(';', ";e", 1);
        assert_eq!(
            Chunked::lenient().take(extensions.as_bytes()),
            Ok((extensions.len(), true))
        );
        for bad in [
            &b"10000000000000000\r\n"[..],
            b"5 6\r\n",
            b" 5\r\n",
            b"5 x\r\n",
            b"0\r\nx: y\rz",
            bigger.as_bytes(),
            many.as_bytes(),
            more.as_bytes(),
        ] {
            assert!(
                Chunked::lenient().take(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
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
