//! Where each field of a YAML document is: a map from field paths such as
//! `spec.nodePools[1].count` to line and column, built from one pass of the YAML parser.
//!
//! serde-saphyr reports a location for its own errors but no field path, and semantic checks
//! know the path but not the location; this map connects the two.

use std::collections::HashMap;

use serde_saphyr::granit_parser::{Event, Parser};

/// A 1-based line and column in the source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Pos {
    /// Line, from 1.
    pub line: usize,
    /// Column, from 1.
    pub column: usize,
}

#[derive(Debug, Clone)]
struct Entry {
    path: String,
    key: Option<Pos>,
    value: Pos,
    scalar: bool,
    /// The scalar's text, to quote it in messages.
    text: Option<String>,
}

/// Field path -> location of a parsed document.
#[derive(Debug, Default)]
pub struct PathMap {
    entries: Vec<Entry>,
    by_path: HashMap<String, usize>,
}

/// Appends a mapping key to a path: `a.b` for plain keys, `a["x.y/z"]` for keys with other
/// characters (label keys), so that every path reads unambiguously.
pub fn join_key(parent: &str, key: &str) -> String {
    let plain = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    match (parent.is_empty(), plain) {
        (true, true) => key.to_owned(),
        (false, true) => format!("{parent}.{key}"),
        (_, false) => format!("{parent}[{key:?}]"),
    }
}

/// Appends a sequence index to a path: `a[3]`.
pub fn join_index(parent: &str, index: usize) -> String {
    format!("{parent}[{index}]")
}

enum Frame {
    Map {
        path: String,
        key: Option<(String, Pos)>,
    },
    Seq {
        path: String,
        next: usize,
    },
}

impl PathMap {
    /// Builds the map from YAML text. Stops quietly at a syntax error: the parts before it are
    /// still mapped, and the deserializer reports the error itself.
    pub fn build(text: &str) -> PathMap {
        let mut map = PathMap::default();
        let mut stack: Vec<Frame> = Vec::new();
        let mut skip_depth = 0usize;
        let mut seen_root = false;
        for item in Parser::new_from_str(text) {
            let Ok((event, span)) = item else { break };
            let pos = Pos {
                line: span.start.line(),
                column: span.start.col() + 1,
            };
            let (is_node, opens, closes) = match &event {
                Event::Scalar(..) | Event::Alias(_) => (true, false, false),
                Event::MappingStart(..) | Event::SequenceStart(..) => (true, true, false),
                Event::MappingEnd | Event::SequenceEnd => (false, false, true),
                _ => (false, false, false),
            };
            if skip_depth > 0 {
                if opens {
                    skip_depth += 1;
                } else if closes {
                    skip_depth -= 1;
                }
                continue;
            }
            if closes {
                stack.pop();
                continue;
            }
            if !is_node {
                continue;
            }
            // Work out the path of this node from its parent frame.
            let (path, key_pos) = match stack.last_mut() {
                None => {
                    if seen_root {
                        // A second document: not mapped.
                        break;
                    }
                    seen_root = true;
                    (String::new(), None)
                }
                Some(Frame::Map { key, path }) => match key.take() {
                    None => {
                        if let Event::Scalar(text, ..) = &event {
                            *key = Some((text.to_string(), pos));
                        } else if opens {
                            skip_depth = 1;
                            // The value of a complex key is mapped under a placeholder name.
                            *key = Some(("?".to_owned(), pos));
                        }
                        continue;
                    }
                    Some((k, kpos)) => (join_key(path, &k), Some(kpos)),
                },
                Some(Frame::Seq { path, next }) => {
                    let p = join_index(path, *next);
                    *next += 1;
                    (p, None)
                }
            };
            let text = match &event {
                Event::Scalar(t, ..) => Some(t.to_string()),
                _ => None,
            };
            map.insert(Entry {
                path: path.clone(),
                key: key_pos,
                value: pos,
                scalar: !opens,
                text,
            });
            match event {
                Event::MappingStart(..) => stack.push(Frame::Map { path, key: None }),
                Event::SequenceStart(..) => stack.push(Frame::Seq { path, next: 0 }),
                _ => {}
            }
        }
        map
    }

    fn insert(&mut self, entry: Entry) {
        // With duplicate keys the first occurrence wins; the deserializer rejects duplicates.
        if !self.by_path.contains_key(&entry.path) {
            self.by_path.insert(entry.path.clone(), self.entries.len());
        }
        self.entries.push(entry);
    }

    /// Location to report for `path`: the value of a scalar field, the key of a block mapping
    /// or sequence field. Paths absent from the document (defaulted fields) fall back to their
    /// closest present ancestor, and finally to the start of the document.
    pub fn locate(&self, path: &str) -> Pos {
        let mut p = path;
        loop {
            if let Some(&i) = self.by_path.get(p) {
                let e = &self.entries[i];
                return if e.scalar {
                    e.value
                } else {
                    e.key.unwrap_or(e.value)
                };
            }
            match parent_path(p) {
                Some(parent) => p = parent,
                None => return Pos { line: 1, column: 1 },
            }
        }
    }

    /// Field path of the mapping entry whose key starts at `pos`, if any.
    pub fn path_of_key_at(&self, pos: Pos) -> Option<&str> {
        self.entries
            .iter()
            .rev()
            .find(|e| e.key == Some(pos))
            .map(|e| e.path.as_str())
    }

    /// Field path of the node whose key (`prefer_key`) or value starts at `pos`, if any.
    pub fn path_at(&self, pos: Pos, prefer_key: bool) -> Option<&str> {
        let by_key = self.entries.iter().rev().find(|e| e.key == Some(pos));
        let by_value = self.entries.iter().rev().find(|e| e.value == pos);
        let found = if prefer_key {
            by_key.or(by_value)
        } else {
            by_value.or(by_key)
        };
        found.map(|e| e.path.as_str())
    }

    /// Text of the scalar value that starts at `pos`, if any.
    pub fn scalar_at(&self, pos: Pos) -> Option<&str> {
        self.entries
            .iter()
            .find(|e| e.scalar && e.value == pos)
            .and_then(|e| e.text.as_deref())
    }

    /// Whether the document has a node at `path`.
    pub fn contains(&self, path: &str) -> bool {
        self.by_path.contains_key(path)
    }
}

/// The parent of a path (`a.b[2]` -> `a.b`, `a.b` -> `a`, `a` -> ``), or None for the root.
pub fn parent_path(path: &str) -> Option<&str> {
    if path.is_empty() {
        return None;
    }
    if path.ends_with(']') {
        // Find the '[' that opens the last segment, skipping brackets inside quotes.
        let mut in_quotes = false;
        let mut escaped = false;
        let mut open = None;
        for (i, c) in path.char_indices() {
            match c {
                '\\' if in_quotes && !escaped => {
                    escaped = true;
                    continue;
                }
                '"' if !escaped => in_quotes = !in_quotes,
                '[' if !in_quotes => open = Some(i),
                _ => {}
            }
            escaped = false;
        }
        return open.map(|i| &path[..i]);
    }
    Some(path.rfind('.').map_or("", |i| &path[..i]))
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = "\
a:
  b: 1
  list:
    - name: x
      n: 2
    - {name: y, n: 3}
  labels:
    node.kubernetes.io/role: web
";

    #[test]
    fn maps_paths_to_positions() {
        let m = PathMap::build(DOC);
        assert_eq!(m.locate("a.b"), Pos { line: 2, column: 6 });
        assert_eq!(m.locate("a.list"), Pos { line: 3, column: 3 });
        assert_eq!(
            m.locate("a.list[0].n"),
            Pos {
                line: 5,
                column: 10
            }
        );
        assert_eq!(
            m.locate("a.list[1].n"),
            Pos {
                line: 6,
                column: 20
            }
        );
        assert_eq!(
            m.locate("a.labels[\"node.kubernetes.io/role\"]"),
            Pos {
                line: 8,
                column: 30
            }
        );
        // Absent fields fall back to the closest ancestor.
        assert_eq!(m.locate("a.list[1].missing"), Pos { line: 6, column: 7 });
        assert_eq!(m.locate("zzz"), Pos { line: 1, column: 1 });
        assert_eq!(
            m.path_at(Pos { line: 5, column: 7 }, true),
            Some("a.list[0].n")
        );
    }

    #[test]
    fn parent_paths() {
        assert_eq!(parent_path("a.b[2]"), Some("a.b"));
        assert_eq!(parent_path("a.b"), Some("a"));
        assert_eq!(parent_path("a"), Some(""));
        assert_eq!(parent_path("a[\"x.y[1]\"]"), Some("a"));
        assert_eq!(parent_path(""), None);
    }
}
