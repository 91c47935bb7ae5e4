//! Policy files as trees of positioned YAML nodes.
//!
//! This module owns reading text (YAML, or JSON, which is a subset of YAML
//! 1.2) into one [`Node`] tree per document, each node remembering its line
//! and column, and finding the node a [`FieldPath`] names. It never knows the
//! policy schema: the tree becomes a `serde_json::Value` for serde, and errors
//! found later are mapped back to lines through their field path.
//!
//! Anchors and aliases are refused (a policy has no use for them and they make
//! "billion laughs" inputs possible), as are tags and duplicate keys, which
//! YAML parsers otherwise resolve silently.

use std::collections::HashSet;
use std::fmt;

use saphyr_parser::{Event, Parser, ScalarStyle, ScanError, Span};
use serde_json::Value;

use super::path::{FieldPath, Segment};

/// A place in a source text, both 1-based.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Pos {
    pub line: usize,
    pub column: usize,
}

impl Pos {
    fn of(span: &Span) -> Self {
        Self {
            line: span.start.line(),
            column: span.start.col() + 1,
        }
    }
}

impl fmt::Display for Pos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.line, self.column)
    }
}

/// Why a document of a text is not one we accept.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct SyntaxError {
    pub pos: Pos,
    /// Which document of the text, counting from 1 as YAML counts them
    /// (an empty one too); 0 until [`parse_each`] knows.
    pub document: usize,
    pub message: String,
}

impl SyntaxError {
    fn new(pos: Pos, message: impl Into<String>) -> Self {
        Self {
            pos,
            document: 0,
            message: message.into(),
        }
    }

    /// A scanner's error, in a text whose first line is line `base + 1`.
    fn scan(e: &ScanError, base: usize) -> Self {
        let pos = Pos {
            line: e.marker().line() + base,
            column: e.marker().col() + 1,
        };
        Self::new(pos, format!("YAML syntax error: {}", e.info()))
    }
}

/// One YAML node and where it starts.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Node {
    Scalar { pos: Pos, text: String, plain: bool },
    Seq { pos: Pos, items: Vec<Node> },
    Map { pos: Pos, entries: Vec<Entry> },
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Entry {
    pub key: String,
    pub key_pos: Pos,
    pub value: Node,
}

impl Node {
    pub fn pos(&self) -> Pos {
        match self {
            Node::Scalar { pos, .. } | Node::Seq { pos, .. } | Node::Map { pos, .. } => *pos,
        }
    }

    /// An empty document (only comments, or a stray `---`).
    pub fn is_empty_document(&self) -> bool {
        matches!(self, Node::Scalar { text, plain: true, .. } if is_null(text))
    }

    /// The position of what `path` names, or of the deepest node on the way
    /// that exists (a missing field is reported on its parent). With `key`,
    /// a mapping entry is reported at its key rather than its value, which is
    /// where an unknown field should point.
    pub fn locate(&self, path: &FieldPath, key: bool) -> Pos {
        let mut node = self;
        let segments = path.segments();
        for (i, segment) in segments.iter().enumerate() {
            let last = i + 1 == segments.len();
            let next = match (node, segment) {
                (Node::Map { entries, .. }, Segment::Field(name)) => {
                    match entries.iter().find(|e| e.key == **name) {
                        Some(entry) if last && key => return entry.key_pos,
                        Some(entry) => &entry.value,
                        None => break,
                    }
                }
                (Node::Seq { items, .. }, Segment::Index(i)) => match items.get(*i) {
                    Some(item) => item,
                    None => break,
                },
                _ => break,
            };
            node = next;
        }
        node.pos()
    }

    /// The tree as a JSON value, scalars typed by the YAML 1.2 core schema.
    pub fn to_json(&self) -> Value {
        match self {
            Node::Scalar { text, plain, .. } if *plain => plain_scalar(text),
            Node::Scalar { text, .. } => Value::String(text.clone()),
            Node::Seq { items, .. } => Value::Array(items.iter().map(Node::to_json).collect()),
            Node::Map { entries, .. } => Value::Object(
                entries
                    .iter()
                    .map(|e| (e.key.clone(), e.value.to_json()))
                    .collect(),
            ),
        }
    }
}

fn is_null(text: &str) -> bool {
    matches!(text, "" | "~" | "null" | "Null" | "NULL")
}

/// Resolves a plain scalar as the YAML 1.2 core schema does (so `no` stays
/// a string and `0755` is a decimal).
fn plain_scalar(text: &str) -> Value {
    if is_null(text) {
        return Value::Null;
    }
    match text {
        "true" | "True" | "TRUE" => return Value::Bool(true),
        "false" | "False" | "FALSE" => return Value::Bool(false),
        _ => {}
    }
    let digits = text.strip_prefix(['-', '+']).unwrap_or(text);
    if !digits.is_empty()
        && digits.bytes().all(|b| b.is_ascii_digit())
        && let Ok(n) = text.parse::<i64>()
    {
        return Value::from(n);
    }
    let radix = [("0x", 16), ("0o", 8)]
        .into_iter()
        .find_map(|(prefix, radix)| Some((text.strip_prefix(prefix)?, radix)));
    if let Some((digits, radix)) = radix
        && let Ok(n) = i64::from_str_radix(digits, radix)
    {
        return Value::from(n);
    }
    let looks_numeric = digits.starts_with(|c: char| c.is_ascii_digit() || c == '.')
        && digits
            .bytes()
            .all(|b| b.is_ascii_digit() || matches!(b, b'.' | b'e' | b'E' | b'-' | b'+'));
    if looks_numeric
        && let Some(n) = text
            .parse::<f64>()
            .ok()
            .and_then(serde_json::Number::from_f64)
    {
        return Value::Number(n);
    }
    Value::String(text.to_owned())
}

/// Whether a plain scalar with this text reads back as the same string.
pub(crate) fn resolves_to_string(text: &str) -> bool {
    matches!(plain_scalar(text), Value::String(_))
}

/// Every document of a stream, each handed to `each` as soon as it is
/// complete (a text of many documents is never held as trees at once), and
/// each document's syntax error, handed over in its place. A document with
/// a syntax error hides neither the documents before it nor those after:
/// reading starts again at the next line that starts a document (`---`),
/// as whoever split the text meant, and goes on to its end, or to the
/// [`MAX_SYNTAX_ERRORS`]th error, which says the rest is not read.
pub(crate) fn parse_each(text: &str, mut each: impl FnMut(Result<Node, SyntaxError>)) {
    // Where the part of `text` being read starts: a byte offset, the
    // number of lines before it, and the number of documents begun before.
    let (mut offset, mut base, mut documents) = (0, 0, 0);
    let mut errors = 0;
    // The first document at or after `offset` with too long a flow
    // collection: where it starts, and the error (its line in `text`).
    let mut overlong: Option<Option<(usize, SyntaxError)>> = None;
    loop {
        let rest = &text[offset..];
        // The scanner queues every token of a flow collection (`[...]`,
        // `{...}`) before it yields the collection's first event, a few
        // hundred bytes each, so a document of a list of millions is
        // refused before it is scanned; the documents before it are read.
        if overlong
            .as_ref()
            .is_none_or(|found| found.as_ref().is_some_and(|(start, _)| *start < offset))
        {
            overlong = Some(overlong_flow(rest).map(|(start, mut e)| {
                e.pos.line += base;
                (offset + start, e)
            }));
        }
        let (readable, refused) = match overlong.as_ref().and_then(Option::as_ref) {
            Some((start, error)) => (&text[offset..*start], Some(error)),
            None => (rest, None),
        };
        let mut builder = Builder {
            base,
            ..Builder::default()
        };
        // The line the document being read started on, while one is.
        let mut open: Option<usize> = None;
        let mut failed = None;
        for event in Parser::new_from_str(readable) {
            let step = match event {
                Ok((event, span)) => {
                    match event {
                        Event::DocumentStart(_) => {
                            documents += 1;
                            open = Some(span.start.line() + base);
                        }
                        Event::DocumentEnd => open = None,
                        _ => {}
                    }
                    builder.push(event, &span)
                }
                Err(e) => Err(SyntaxError::scan(&e, base)),
            };
            match step {
                Ok(Some(root)) if !root.is_empty_document() => each(Ok(root)),
                Ok(_) => {}
                Err(e) => {
                    failed = Some((e, open));
                    break;
                }
            }
        }
        // The error, and the line after which the next document may start.
        let (mut error, after) = match (failed, refused) {
            (Some((e, Some(start))), _) => (e, start),
            // Between documents: it is in the next one.
            (Some((e, None)), _) => {
                documents += 1;
                let line = e.pos.line;
                (e, line)
            }
            // The document the bound refused starts where `readable` ends.
            (None, Some(e)) => {
                documents += 1;
                (e.clone(), e.pos.line)
            }
            (None, None) => return,
        };
        error.document = documents;
        errors += 1;
        if errors == MAX_SYNTAX_ERRORS {
            error.message.push_str(&format!(
                " (and the rest of the text is not read: {MAX_SYNTAX_ERRORS} documents with \
                 syntax errors)"
            ));
            return each(Err(error));
        }
        each(Err(error));
        let next = rest
            .split_inclusive('\n')
            .scan(offset, |at, line| {
                let start = *at;
                *at += line.len();
                Some((start, line))
            })
            .enumerate()
            .find(|&(index, (_, line))| base + index + 1 > after && starts_document(line));
        match next {
            Some((index, (start, _))) => (offset, base) = (start, base + index),
            None => return,
        }
    }
}

/// How many documents of one text with a syntax error are reported before
/// the rest of the text is left unread: as many as diagnostics are listed.
/// A scanner that meets an open flow collection reads on past the next
/// `---`, up to its nesting limit, so reading on after each such document
/// reads up to a few hundred lines again; a bound keeps a hostile text of
/// many from taking minutes.
const MAX_SYNTAX_ERRORS: usize = super::validate::MAX_DIAGNOSTICS;

/// Whether `line` begins a document: `---` at its start, then a space, a
/// tab or its end.
fn starts_document(line: &str) -> bool {
    line.strip_prefix("---")
        .is_some_and(|rest| rest.chars().next().is_none_or(char::is_whitespace))
}

/// The first document of `text` with more than [`MAX_NODES`] commas (each
/// separates two items of a flow collection, so it bounds their number;
/// a comma inside a string counts too, and no policy comes near): where
/// the document starts (a byte offset), and the error, at the comma past
/// the bound. A document starts at a line that begins with `---`.
fn overlong_flow(text: &str) -> Option<(usize, SyntaxError)> {
    let (mut start, mut offset, mut commas) = (0, 0, 0);
    for (index, line) in text.split_inclusive('\n').enumerate() {
        if starts_document(line) {
            (start, commas) = (offset, 0);
        }
        offset += line.len();
        let in_line = line.bytes().filter(|b| *b == b',').count();
        if commas + in_line <= MAX_NODES {
            commas += in_line;
            continue;
        }
        let (at, _) = line
            .match_indices(',')
            .nth(MAX_NODES - commas)
            .expect("the line holds the comma past the bound");
        let pos = Pos {
            line: index + 1,
            column: line[..at].chars().count() + 1,
        };
        let message = format!(
            "more than {MAX_NODES} list items in one document: a policy needs far fewer, so \
             the document is refused here"
        );
        return Some((start, SyntaxError::new(pos, message)));
    }
    None
}

/// [`parse_each`], collecting the documents; the first syntax error.
#[cfg(test)]
pub(crate) fn parse_stream(text: &str) -> (Vec<Node>, Option<SyntaxError>) {
    let (documents, errors) = parse_all(text);
    (documents, errors.into_iter().next())
}

/// [`parse_each`], collecting the documents and the syntax errors.
#[cfg(test)]
pub(crate) fn parse_all(text: &str) -> (Vec<Node>, Vec<SyntaxError>) {
    let (mut documents, mut errors) = (Vec::new(), Vec::new());
    parse_each(text, |read| match read {
        Ok(root) => documents.push(root),
        Err(e) => errors.push(e),
    });
    (documents, errors)
}

/// Far deeper than any policy; bounds the recursion of later passes (and of
/// dropping the tree) on hostile input.
const MAX_DEPTH: usize = 32;

/// Far more nodes than any policy has (a selector of thousands of SPIFFE
/// IDs is a few thousand); bounds the memory one document's tree takes
/// (about 150 bytes a node) on hostile or mistaken input, such as a list of
/// millions of ports on one line.
pub const MAX_NODES: usize = 50_000;

/// Builds nodes from parser events; a stack of open collections.
#[derive(Default)]
struct Builder {
    /// The lines of the text before the part parsed.
    base: usize,
    open: Vec<Open>,
    /// Nodes begun in the document being built.
    nodes: usize,
}

enum Open {
    Seq(Pos, Vec<Node>),
    /// A mapping, the key waiting for its value, and the keys seen (a
    /// duplicate is found in one lookup, not by scanning every entry:
    /// a mapping of many keys would otherwise take quadratic time).
    Map(Pos, Vec<Entry>, Option<(String, Pos)>, HashSet<String>),
}

impl Builder {
    /// Feeds one event; returns a document's root when one completes.
    fn push(&mut self, event: Event<'_>, span: &Span) -> Result<Option<Node>, SyntaxError> {
        let mut pos = Pos::of(span);
        pos.line += self.base;
        if matches!(
            event,
            Event::Scalar(..) | Event::SequenceStart(..) | Event::MappingStart(..)
        ) {
            self.nodes += 1;
            if self.nodes > MAX_NODES {
                return Err(SyntaxError::new(
                    pos,
                    format!(
                        "more than {MAX_NODES} YAML nodes in one document: a policy needs far \
                         fewer, so the document is refused here"
                    ),
                ));
            }
        }
        let node = match event {
            Event::Alias(_) => {
                return Err(SyntaxError::new(pos, "YAML aliases are not supported"));
            }
            Event::Scalar(_, _, anchor, _)
            | Event::SequenceStart(anchor, _)
            | Event::MappingStart(anchor, _)
                if anchor != 0 =>
            {
                return Err(SyntaxError::new(pos, "YAML anchors are not supported"));
            }
            Event::Scalar(_, _, _, Some(tag))
            | Event::SequenceStart(_, Some(tag))
            | Event::MappingStart(_, Some(tag)) => {
                return Err(SyntaxError::new(
                    pos,
                    format!("YAML tags are not supported (found {tag})"),
                ));
            }
            Event::Scalar(text, style, _, None) => Node::Scalar {
                pos,
                text: text.into_owned(),
                plain: style == ScalarStyle::Plain,
            },
            Event::SequenceStart(..) | Event::MappingStart(..) if self.open.len() >= MAX_DEPTH => {
                return Err(SyntaxError::new(
                    pos,
                    format!("nesting deeper than {MAX_DEPTH} levels"),
                ));
            }
            Event::SequenceStart(..) => {
                self.open.push(Open::Seq(pos, Vec::new()));
                return Ok(None);
            }
            Event::MappingStart(..) => {
                self.open
                    .push(Open::Map(pos, Vec::new(), None, HashSet::new()));
                return Ok(None);
            }
            Event::SequenceEnd | Event::MappingEnd => match self.open.pop() {
                Some(Open::Seq(pos, items)) => Node::Seq { pos, items },
                Some(Open::Map(pos, entries, _, _)) => Node::Map { pos, entries },
                None => return Ok(None),
            },
            _ => return Ok(None),
        };
        self.attach(node)
    }

    fn attach(&mut self, node: Node) -> Result<Option<Node>, SyntaxError> {
        match self.open.last_mut() {
            None => {
                self.nodes = 0;
                Ok(Some(node))
            }
            Some(Open::Seq(_, items)) => {
                items.push(node);
                Ok(None)
            }
            Some(Open::Map(_, entries, pending, keys)) => {
                match pending.take() {
                    Some((key, key_pos)) => entries.push(Entry {
                        key,
                        key_pos,
                        value: node,
                    }),
                    None => {
                        let Node::Scalar { pos, text, .. } = node else {
                            return Err(SyntaxError::new(
                                node.pos(),
                                "mapping keys must be plain strings",
                            ));
                        };
                        if !keys.insert(text.clone()) {
                            return Err(SyntaxError::new(pos, format!("duplicate key {text:?}")));
                        }
                        *pending = Some((text, pos));
                    }
                }
                Ok(None)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn one(text: &str) -> Node {
        let (mut docs, err) = parse_stream(text);
        assert_eq!(err, None);
        assert_eq!(docs.len(), 1);
        docs.remove(0)
    }

    #[test]
    fn scalars_follow_the_core_schema() {
        let node =
            one("a: 8080\nb: no\nc: \"8080\"\nd: ~\ne: true\nf: 1.5\ng: 0x10\nh: spiffe://x/y\n");
        assert_eq!(
            node.to_json(),
            json!({"a": 8080, "b": "no", "c": "8080", "d": null, "e": true, "f": 1.5, "g": 16, "h": "spiffe://x/y"})
        );
    }

    #[test]
    fn locates_values_and_keys() {
        let node = one("spec:\n  rules:\n    - from:\n        - spiffeId: x\n");
        let path = FieldPath::root()
            .field("spec")
            .field("rules")
            .index(0)
            .field("from")
            .index(0)
            .field("spiffeId");
        assert_eq!(
            node.locate(&path, false),
            Pos {
                line: 4,
                column: 21
            }
        );
        assert_eq!(
            node.locate(&path, true),
            Pos {
                line: 4,
                column: 11
            }
        );
        // A missing field is reported where its parent is.
        let missing = FieldPath::root().field("spec").field("selector");
        assert_eq!(node.locate(&missing, false), Pos { line: 2, column: 3 });
    }

    #[test]
    fn splits_documents_and_skips_empty_ones() {
        let (docs, err) = parse_stream("---\na: 1\n---\n# nothing\n---\n{\"b\": 2}\n");
        assert_eq!(err, None);
        assert_eq!(docs.len(), 2);
        assert_eq!(docs[1].to_json(), json!({"b": 2}));
        assert_eq!(docs[1].pos().line, 6);
    }

    /// A mapping of many keys is checked for duplicates in one lookup per
    /// key: scanning every earlier key made a 4 MB file take minutes.
    #[test]
    fn a_duplicate_after_many_keys_is_found_at_its_line() {
        let mut text: String = (0..20_000).map(|i| format!("k{i}: 0\n")).collect();
        text.push_str("k19999: 1\n");
        let (_, err) = parse_stream(&text);
        let err = err.expect("the duplicate was not found");
        assert_eq!(err.pos.line, 20_001);
        assert!(err.message.contains("duplicate key \"k19999\""), "{err:?}");
    }

    #[test]
    fn refuses_duplicate_keys_aliases_and_tags() {
        for (text, line, needle) in [
            ("a: 1\nb: 2\na: 3\n", 3, "duplicate key \"a\""),
            ("a: &x 1\nb: *x\n", 1, "anchors"),
            ("a: !custom 1\n", 1, "tags"),
            (
                &format!("a: {}", "[".repeat(100)),
                1,
                "nesting deeper than 32 levels",
            ),
        ] {
            let (_, err) = parse_stream(text);
            let err = err.unwrap_or_else(|| panic!("{text:?} should fail"));
            assert_eq!(err.pos.line, line, "{text:?}");
            assert!(err.message.contains(needle), "{}", err.message);
        }
    }

    #[test]
    fn a_flow_list_of_too_many_items_is_refused_before_it_is_scanned() {
        let small = "a: [1, 2]\n";
        for separator in [",", ",\n  "] {
            let ports = vec!["1"; MAX_NODES + 2].join(separator);
            let text = format!("{small}--- # two\nports: [{ports}]\n---\n{small}");
            let (docs, err) = parse_stream(&text);
            assert_eq!(docs.len(), 2, "the documents before and after it are read");
            let err = err.expect("refused");
            assert!(
                err.message.contains("more than 50000 list items"),
                "{err:?}"
            );
            if separator == "," {
                assert_eq!(err.pos.line, 3);
                assert_eq!(err.pos.column, "ports: [".len() + 2 * (MAX_NODES + 1));
            } else {
                assert_eq!(err.pos.line, 3 + MAX_NODES);
                assert_eq!(err.pos.column, 4);
            }
        }
        // The bound is per document.
        let lists = vec!["a: [1, 2, 3]\n"; MAX_NODES].join("---\n");
        let (docs, err) = parse_stream(&lists);
        assert_eq!((docs.len(), err), (MAX_NODES, None));
    }

    #[test]
    fn a_document_of_too_many_nodes_is_refused_where_it_passes_the_bound() {
        let ports = vec!["- 1\n"; MAX_NODES].concat();
        let small = "a: [1, 2]\n";
        let text = format!("{small}---\nports:\n{ports}---\n{small}");
        let (docs, err) = parse_stream(&text);
        assert_eq!(docs.len(), 2, "the documents before and after it are read");
        let err = err.expect("refused");
        assert!(
            err.message.contains("more than 50000 YAML nodes"),
            "{err:?}"
        );
        // The mapping, its key and the list took three nodes, so the item
        // that passes the bound is the one at index MAX_NODES - 3, on line
        // 4 + MAX_NODES - 3.
        assert_eq!((err.pos.line, err.pos.column), (MAX_NODES + 1, 3));
        // The bound is per document: many documents of a few nodes pass.
        let many = vec![small; MAX_NODES].join("---\n");
        let (docs, err) = parse_stream(&many);
        assert_eq!((docs.len(), err), (MAX_NODES, None));
    }

    /// Each document with a syntax error is reported, at its line and by
    /// its number, and neither hides the documents before or after it.
    #[test]
    fn every_document_with_a_syntax_error_is_reported_and_the_others_read() {
        let text = "# policies\na: 1\n---\nb: [1, 2\n---\nc: 1\n--- # four\nd: 1\nd: 2\n\
                    ---\ne: 1\n";
        let (documents, errors) = parse_all(text);
        let read: Vec<_> = documents.iter().map(|d| (d.to_json(), d.pos())).collect();
        assert_eq!(
            read,
            [
                (json!({"a": 1}), Pos { line: 2, column: 1 }),
                (json!({"c": 1}), Pos { line: 6, column: 1 }),
                (
                    json!({"e": 1}),
                    Pos {
                        line: 11,
                        column: 1
                    }
                ),
            ]
        );
        let found: Vec<_> = errors
            .iter()
            .map(|e| (e.document, e.pos.line, e.message.as_str()))
            .collect();
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert_eq!(found[0].0, 2, "{errors:?}");
        assert!(found[0].2.starts_with("YAML syntax error: "), "{errors:?}");
        assert!((4..=5).contains(&found[0].1), "{errors:?}");
        assert_eq!(found[1], (4, 9, "duplicate key \"d\""));
        assert_eq!(errors[1].pos.column, 1);
    }

    /// A document refused for its size is one error among the others.
    #[test]
    fn an_overlong_document_is_numbered_and_the_next_one_read() {
        let ports = vec!["1"; MAX_NODES + 2].join(",");
        let text = format!("a: [1\n---\nports: [{ports}]\n---\nb: 2\n");
        let (documents, errors) = parse_all(&text);
        assert_eq!(documents.len(), 1);
        assert_eq!(documents[0].to_json(), json!({"b": 2}));
        assert_eq!(documents[0].pos().line, 5);
        let found: Vec<_> = errors.iter().map(|e| (e.document, e.pos.line)).collect();
        assert_eq!(found, [(1, 2), (2, 3)], "{errors:?}");
        assert!(errors[1].message.contains("more than 50000 list items"));
    }

    /// Past a bound, the rest of a text of many broken documents is left
    /// unread, and the last error says so.
    #[test]
    fn stops_after_a_thousand_documents_with_syntax_errors() {
        let text = "a: [1\n---\n".repeat(MAX_SYNTAX_ERRORS + 5) + "b: 1\n";
        let (documents, errors) = parse_all(&text);
        assert_eq!(errors.len(), MAX_SYNTAX_ERRORS);
        assert_eq!(documents, []);
        let last = &errors[MAX_SYNTAX_ERRORS - 1];
        assert_eq!(last.document, MAX_SYNTAX_ERRORS);
        assert!(
            last.message.ends_with(
                " (and the rest of the text is not read: 1000 documents with syntax errors)"
            ),
            "{last:?}"
        );
    }

    #[test]
    fn keeps_documents_before_a_syntax_error() {
        let (docs, err) = parse_stream("a: 1\n---\nb: [1, 2\n");
        assert_eq!(docs.len(), 1);
        assert!(err.unwrap().message.starts_with("YAML syntax error"));
    }
}
