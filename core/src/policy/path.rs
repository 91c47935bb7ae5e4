//! Field paths into a policy document, such as `spec.rules[0].from[1].spiffeId`.
//!
//! A path names a field the way an operator reads the YAML, so the same
//! [`FieldPath`] serves an API error ("which field") and a file diagnostic
//! (mapped to a line by `source`). It never holds values.

use std::borrow::Cow;
use std::fmt;

/// One step of a path: a mapping field or a list index.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Segment {
    Field(Cow<'static, str>),
    Index(usize),
}

/// A path from the document root; the empty path is the document itself.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FieldPath(Vec<Segment>);

impl FieldPath {
    pub fn root() -> Self {
        Self::default()
    }

    /// This path extended by a field name.
    pub fn field(&self, name: impl Into<Cow<'static, str>>) -> Self {
        let mut path = self.clone();
        path.0.push(Segment::Field(name.into()));
        path
    }

    /// This path extended by a list index.
    pub fn index(&self, i: usize) -> Self {
        let mut path = self.clone();
        path.0.push(Segment::Index(i));
        path
    }

    pub fn segments(&self) -> &[Segment] {
        &self.0
    }

    pub fn is_root(&self) -> bool {
        self.0.is_empty()
    }

    /// Parses the text form back (`a.b[0].c`); field names hold no `.` or `[`.
    pub fn parse(text: &str) -> Self {
        let mut path = Self::root();
        for part in text.split('.').filter(|p| !p.is_empty()) {
            let (name, indices) = part.split_at(part.find('[').unwrap_or(part.len()));
            if !name.is_empty() {
                path = path.field(name.to_owned());
            }
            for index in indices.split(['[', ']']).filter(|s| !s.is_empty()) {
                match index.parse() {
                    Ok(i) => path = path.index(i),
                    Err(_) => path = path.field(index.to_owned()),
                }
            }
        }
        path
    }

    pub(crate) fn from_serde(path: &serde_path_to_error::Path) -> Self {
        use serde_path_to_error::Segment as S;
        let mut out = Self::root();
        for segment in path.iter() {
            out = match segment {
                S::Seq { index } => out.index(*index),
                S::Map { key } => out.field(key.clone()),
                S::Enum { variant } => out.field(variant.clone()),
                S::Unknown => out,
            };
        }
        out
    }
}

impl fmt::Display for FieldPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, segment) in self.0.iter().enumerate() {
            match segment {
                Segment::Field(name) if i == 0 => f.write_str(name)?,
                Segment::Field(name) => write!(f, ".{name}")?,
                Segment::Index(index) => write!(f, "[{index}]")?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn displays_and_parses_back() {
        let path = FieldPath::root()
            .field("spec")
            .field("rules")
            .index(0)
            .field("from")
            .index(1)
            .field("spiffeId");
        assert_eq!(path.to_string(), "spec.rules[0].from[1].spiffeId");
        assert_eq!(FieldPath::parse("spec.rules[0].from[1].spiffeId"), path);
        assert_eq!(FieldPath::root().to_string(), "");
    }
}
