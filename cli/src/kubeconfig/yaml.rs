//! A generic YAML value that keeps mapping order, read with serde-saphyr and written by a small
//! block-style emitter.
//!
//! kubectl reads kubeconfigs with go-yaml v2 (YAML 1.1 scalars: `yes`, `on`, `y` are booleans),
//! so the reader resolves booleans the YAML 1.1 way and the writer quotes every string that
//! either YAML 1.1 or 1.2 could read as something else. Strings are written plain only when they
//! are obviously strings (`v1`, `https://10.0.0.2:6443`, base64 data); everything else is a
//! double-quoted scalar with escapes, which both YAML versions read back to the same text.
//! Comments, anchors and the original quoting style are not kept: the file is rewritten from the
//! values.

use std::fmt::{self, Write as _};

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};

/// A YAML value. Mappings keep their order; keys are strings, as in the JSON that kubectl turns
/// every kubeconfig into.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Node {
    /// `null`, `~` or an empty value.
    Null,
    /// A boolean.
    Bool(bool),
    /// A negative integer.
    Int(i64),
    /// A non-negative integer.
    UInt(u64),
    /// A floating-point number.
    Float(f64),
    /// A string.
    Str(String),
    /// A sequence.
    Seq(Vec<Node>),
    /// A mapping, in document order.
    Map(Vec<(String, Node)>),
}

impl Node {
    /// A short name of the value's type for error messages.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            Node::Null => "null",
            Node::Bool(_) => "a boolean",
            Node::Int(_) | Node::UInt(_) | Node::Float(_) => "a number",
            Node::Str(_) => "a string",
            Node::Seq(_) => "a list",
            Node::Map(_) => "a mapping",
        }
    }

    /// The value of `key` in a mapping (the first, if the key is repeated).
    pub(crate) fn get(&self, key: &str) -> Option<&Node> {
        match self {
            Node::Map(entries) => entries.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    /// The text of a string value.
    pub(crate) fn as_str(&self) -> Option<&str> {
        match self {
            Node::Str(s) => Some(s),
            _ => None,
        }
    }
}

/// Where and why a text is not YAML. The message never quotes the document (which may hold
/// private keys).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ParseError {
    /// 1-based line, when the parser knows it.
    pub(crate) line: Option<u64>,
    /// 1-based column, when the parser knows it.
    pub(crate) column: Option<u64>,
    /// What is wrong.
    pub(crate) message: String,
}

/// Parses one YAML document. A text without any content (empty, only comments) is `Null`.
pub(crate) fn parse(text: &str) -> Result<Node, ParseError> {
    if text
        .lines()
        .map(str::trim)
        .all(|l| l.is_empty() || l.starts_with('#'))
    {
        return Ok(Node::Null);
    }
    serde_saphyr::from_str::<Node>(text).map_err(|e| {
        use serde_saphyr::MessageFormatter;
        // Without the snippet: it would print lines of the file, which may hold a private key.
        let inner = e.without_snippet();
        let raw = serde_saphyr::UserMessageFormatter
            .format_message(inner)
            .into_owned();
        let location = e.location().filter(|l| l.line() > 0);
        ParseError {
            line: location.map(|l| l.line()),
            column: location.map(|l| l.column()),
            message: clean_message(&raw),
        }
    })
}

/// First line of a parser message without the position suffix (printed separately) and without
/// a trailing period, at most 200 characters.
fn clean_message(raw: &str) -> String {
    let msg = raw.lines().next().unwrap_or(raw).trim();
    let msg = match msg.rfind(" at line ") {
        Some(i) if msg[i..].contains("column") => &msg[..i],
        _ => msg,
    };
    let msg = msg.trim_end_matches('.');
    let mut out: String = msg.chars().take(200).collect();
    if out.len() < msg.len() {
        out.push_str("...");
    }
    if out.is_empty() {
        out.push_str("invalid YAML");
    }
    out
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(NodeVisitor)
    }
}

struct NodeVisitor;

impl<'de> Visitor<'de> for NodeVisitor {
    type Value = Node;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any YAML value")
    }

    fn visit_unit<E>(self) -> Result<Node, E> {
        Ok(Node::Null)
    }

    fn visit_none<E>(self) -> Result<Node, E> {
        Ok(Node::Null)
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Node, D::Error> {
        Node::deserialize(d)
    }

    fn visit_bool<E>(self, v: bool) -> Result<Node, E> {
        Ok(Node::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Node, E> {
        Ok(if v < 0 {
            Node::Int(v)
        } else {
            Node::UInt(v.unsigned_abs())
        })
    }

    fn visit_u64<E>(self, v: u64) -> Result<Node, E> {
        Ok(Node::UInt(v))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Node, E> {
        Ok(Node::Float(v))
    }

    fn visit_str<E>(self, v: &str) -> Result<Node, E> {
        Ok(Node::Str(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Node, E> {
        Ok(Node::Str(v))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Node, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element::<Node>()? {
            items.push(item);
        }
        Ok(Node::Seq(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Node, A::Error> {
        let mut entries: Vec<(String, Node)> = Vec::new();
        while let Some(key) = map.next_key::<Node>()? {
            // The JSON form kubectl converts YAML into has string keys; scalars become text.
            let key = match key {
                Node::Str(s) => s,
                Node::Bool(b) => b.to_string(),
                Node::Int(i) => i.to_string(),
                Node::UInt(u) => u.to_string(),
                Node::Float(f) => f.to_string(),
                Node::Null => "null".to_owned(),
                Node::Seq(_) | Node::Map(_) => {
                    return Err(de::Error::custom(
                        "a mapping key is a list or mapping, which a kubeconfig cannot have",
                    ));
                }
            };
            let value = map.next_value::<Node>()?;
            // A repeated key: the last value wins, as in kubectl's reader.
            match entries.iter_mut().find(|(k, _)| *k == key) {
                Some(slot) => slot.1 = value,
                None => entries.push((key, value)),
            }
        }
        Ok(Node::Map(entries))
    }
}

/// Writes `node` as a block-style YAML document (kubectl's layout: list items of a mapping value
/// at the same indentation as the key). The result ends with a newline. Everything is written
/// into one buffer, so the caller can wipe all copies of the secrets in it.
pub(crate) fn emit(node: &Node) -> String {
    let mut out = String::with_capacity(4096);
    match node {
        Node::Map(entries) if !entries.is_empty() => emit_map(entries, 0, None, &mut out),
        Node::Seq(items) if !items.is_empty() => emit_seq(items, 0, &mut out),
        other => {
            write_scalar(other, &mut out);
            out.push('\n');
        }
    }
    out
}

fn pad(out: &mut String, n: usize) {
    out.extend(std::iter::repeat_n(' ', n));
}

/// Writes mapping entries at `indent`; with `first`, the first line starts with that prefix
/// (`- ` of a list item) instead of the indentation.
fn emit_map(entries: &[(String, Node)], indent: usize, first: Option<&str>, out: &mut String) {
    for (i, (key, value)) in entries.iter().enumerate() {
        match (i, first) {
            (0, Some(prefix)) => out.push_str(prefix),
            _ => pad(out, indent),
        }
        write_string(key, out);
        out.push(':');
        match value {
            Node::Map(inner) if !inner.is_empty() => {
                out.push('\n');
                emit_map(inner, indent + 2, None, out);
            }
            Node::Seq(items) if !items.is_empty() => {
                out.push('\n');
                emit_seq(items, indent, out);
            }
            other => {
                out.push(' ');
                write_scalar(other, out);
                out.push('\n');
            }
        }
    }
}

fn emit_seq(items: &[Node], indent: usize, out: &mut String) {
    for item in items {
        match item {
            Node::Map(entries) if !entries.is_empty() => {
                let mut prefix = String::new();
                pad(&mut prefix, indent);
                prefix.push_str("- ");
                emit_map(entries, indent + 2, Some(&prefix), out);
            }
            Node::Seq(inner) if !inner.is_empty() => {
                pad(out, indent);
                out.push_str("-\n");
                emit_seq(inner, indent + 2, out);
            }
            other => {
                pad(out, indent);
                out.push_str("- ");
                write_scalar(other, out);
                out.push('\n');
            }
        }
    }
}

/// Writes a scalar (or an empty collection) in flow form.
fn write_scalar(node: &Node, out: &mut String) {
    match node {
        Node::Null => out.push_str("null"),
        Node::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Node::Int(i) => {
            let _ = write!(out, "{i}");
        }
        Node::UInt(u) => {
            let _ = write!(out, "{u}");
        }
        Node::Float(f) if f.is_nan() => out.push_str(".nan"),
        Node::Float(f) if f.is_infinite() => out.push_str(if *f > 0.0 { ".inf" } else { "-.inf" }),
        // `{:?}` keeps a fractional part or exponent (`1.0`, `1e300`), so the value stays a float.
        Node::Float(f) => {
            let _ = write!(out, "{f:?}");
        }
        Node::Str(s) => write_string(s, out),
        Node::Seq(_) => out.push_str("[]"),
        Node::Map(_) => out.push_str("{}"),
    }
}

/// Words YAML 1.1 (go-yaml v2, kubectl) or 1.2 read as booleans or null when plain.
const RESERVED_WORDS: &[&str] = &["y", "n", "yes", "no", "on", "off", "true", "false", "null"];

/// Whether `s` reads back as the same string when written plain in block context, in YAML 1.1
/// and 1.2 alike. Deliberately narrow: anything unusual is quoted.
fn plain_is_safe(s: &str) -> bool {
    let bytes = s.as_bytes();
    let Some(&first) = bytes.first() else {
        return false;
    };
    // A letter or `/` first: never a number, `.inf`, an indicator or a merge key `<<`.
    if !(first.is_ascii_alphabetic() || first == b'/') {
        return false;
    }
    if RESERVED_WORDS.iter().any(|w| s.eq_ignore_ascii_case(w)) {
        return false;
    }
    bytes.iter().enumerate().all(|(i, &c)| match c {
        b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' => true,
        b'_' | b'.' | b'/' | b'@' | b'+' | b'=' | b'-' | b'~' => true,
        // `a:b` is plain text, but `: ` or a final `:` would start a mapping.
        b':' => bytes.get(i + 1).is_some_and(|n| *n != b' ' && *n != b':'),
        _ => false,
    })
}

/// Writes a string as a plain scalar when that is safe, else as a double-quoted scalar with
/// escapes.
fn write_string(s: &str, out: &mut String) {
    if plain_is_safe(s) {
        out.push_str(s);
        return;
    }
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            // Control characters, C1 controls (NEL is a line break in YAML 1.1), the Unicode line
            // and paragraph separators and the byte order mark are escaped: a reader would
            // otherwise fold or drop them.
            c if c.is_control() || matches!(c, '\u{2028}' | '\u{2029}' | '\u{feff}') => {
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(text: &str) -> Node {
        parse(text).unwrap_or_else(|e| panic!("{text:?} does not parse: {e:?}"))
    }

    fn parse_error(text: &str) -> ParseError {
        match parse(text) {
            Ok(node) => panic!("{text:?} parsed: {node:?}"),
            Err(e) => e,
        }
    }

    fn round_trip(node: &Node) -> Node {
        let text = emit(node);
        parse(&text).unwrap_or_else(|e| panic!("re-parse of {text:?}: {e:?}"))
    }

    #[test]
    fn tricky_strings_survive_a_round_trip_as_strings() {
        let tricky = [
            "",
            " ",
            "yes",
            "No",
            "ON",
            "off",
            "y",
            "N",
            "true",
            "False",
            "null",
            "Null",
            "~",
            "123",
            "-1",
            "0x1F",
            "0o17",
            "017",
            "1.5",
            "1e3",
            ".inf",
            "-.inf",
            ".nan",
            "1_000",
            "12:30:00",
            "a: b",
            "a:",
            "a:b",
            "- x",
            "#c",
            "a #c",
            "a#c",
            "'q'",
            "\"dq\"",
            "back\\slash",
            "line\nbreak",
            "tab\there",
            "trailing ",
            " leading",
            "*alias",
            "&anchor",
            "!tag",
            "%dir",
            "@at",
            "`tick",
            "{x}",
            "[y]",
            "a,b",
            "?",
            "<<",
            "nel\u{85}x",
            "ls\u{2028}x",
            "bom\u{feff}x",
            "bell\u{7}",
            "é ü 中",
            "---",
            "...",
            "https://10.0.0.2:6443",
            "/home/u/.kube/ca.crt",
            "LS0tLS1CRUdJTi==",
        ];
        for s in tricky {
            let node = Node::Map(vec![
                (s.to_owned(), Node::Str(s.to_owned())),
                ("k".to_owned(), Node::Seq(vec![Node::Str(s.to_owned())])),
            ]);
            assert_eq!(round_trip(&node), node, "string {s:?}");
        }
    }

    #[test]
    fn numbers_booleans_nulls_and_nesting_survive_a_round_trip() {
        let node = Node::Map(vec![
            ("i".into(), Node::Int(-5)),
            ("u".into(), Node::UInt(u64::MAX)),
            ("f".into(), Node::Float(1.0)),
            ("g".into(), Node::Float(1e300)),
            ("h".into(), Node::Float(-0.25)),
            ("b".into(), Node::Bool(false)),
            ("n".into(), Node::Null),
            ("em".into(), Node::Map(vec![])),
            ("es".into(), Node::Seq(vec![])),
            (
                "nested".into(),
                Node::Seq(vec![
                    Node::Seq(vec![Node::UInt(1), Node::Seq(vec![Node::Str("x".into())])]),
                    Node::Map(vec![
                        ("a".into(), Node::Map(vec![("b".into(), Node::Seq(vec![]))])),
                        (
                            "c".into(),
                            Node::Seq(vec![Node::Map(vec![("d".into(), Node::Null)])]),
                        ),
                    ]),
                ]),
            ),
        ]);
        assert_eq!(round_trip(&node), node);
    }

    #[test]
    fn infinities_are_refused_like_kubectl_refuses_them() {
        // kubectl converts YAML to JSON, which has no infinity; the reader refuses it too.
        assert!(parse("a: .inf\n").is_err());
    }

    #[test]
    fn yaml_1_1_booleans_are_read_as_kubectl_reads_them() {
        let node = parsed("a: yes\nb: off\nc: 'yes'\n");
        assert_eq!(node.get("a"), Some(&Node::Bool(true)));
        assert_eq!(node.get("b"), Some(&Node::Bool(false)));
        assert_eq!(node.get("c"), Some(&Node::Str("yes".into())));
    }

    #[test]
    fn mapping_order_is_kept_and_layout_is_kubectls() {
        let text = "kind: Config\napiVersion: v1\nclusters:\n- name: a\n  cluster:\n    server: https://x:6443\n";
        let node = parsed(text);
        assert_eq!(emit(&node), text);
    }

    #[test]
    fn comment_only_text_is_null_and_errors_have_positions_but_no_content() {
        assert_eq!(parsed(""), Node::Null);
        assert_eq!(parsed("# just a comment\n\n"), Node::Null);
        let err =
            parse_error("users:\n- name: a\n  user:\n    client-key-data: SECRETKEY\n   bad: [\n");
        assert!(err.line.is_some(), "{err:?}");
        assert!(!err.message.contains("SECRETKEY"), "{err:?}");
        let err = parse_error("? [a, b]\n: c\n");
        assert!(err.message.contains("mapping key"), "{err:?}");
    }
}
