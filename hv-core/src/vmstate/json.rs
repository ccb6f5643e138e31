//! A small JSON reader and writer for the migration stream's description
//! record (QEMU's "vmdesc").
//!
//! Objects keep their keys in order (a `Vec` of pairs), because QEMU's
//! description is order-sensitive to the eye and Tern writes it byte for
//! byte the way QEMU's `json-writer.c` does: compact, with `", "` between
//! items and `": "` after keys, non-ASCII and control characters escaped as
//! `\uXXXX` (upper-case hex).
//!
//! The reader takes untrusted input (a migration stream): it never panics,
//! limits nesting depth, allocates only in proportion to the input, and
//! reports the byte offset of the first error.

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt::{self, Write};

/// Deepest nesting the reader accepts (QEMU descriptions nest a few levels
/// per struct; 128 leaves a wide margin and bounds recursion).
pub const MAX_DEPTH: usize = 128;

/// A JSON value.
#[derive(Clone, Debug, PartialEq)]
pub enum Json {
    Null,
    Bool(bool),
    /// An integer (QEMU writes `int64` and `uint64` values).
    Int(i128),
    /// A number with a fraction or exponent.
    Float(f64),
    Str(String),
    Array(Vec<Json>),
    /// Key/value pairs in document order.
    Object(Vec<(String, Json)>),
}

/// Why a text is not JSON, and where.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JsonError {
    /// Byte offset in the text.
    pub offset: usize,
    pub what: &'static str,
}

impl fmt::Display for JsonError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "JSON: {} at byte {}", self.what, self.offset)
    }
}

impl Json {
    /// An object from pairs.
    pub fn object(pairs: Vec<(String, Json)>) -> Self {
        Json::Object(pairs)
    }

    /// The value of `key` if this is an object that has it (first match).
    pub fn get(&self, key: &str) -> Option<&Json> {
        match self {
            Json::Object(pairs) => pairs.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Json::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_i128(&self) -> Option<i128> {
        match self {
            Json::Int(v) => Some(*v),
            _ => None,
        }
    }

    /// A non-negative integer that fits `u64`.
    pub fn as_u64(&self) -> Option<u64> {
        self.as_i128().and_then(|v| u64::try_from(v).ok())
    }

    pub fn as_array(&self) -> Option<&[Json]> {
        match self {
            Json::Array(a) => Some(a),
            _ => None,
        }
    }

    pub fn as_object(&self) -> Option<&[(String, Json)]> {
        match self {
            Json::Object(o) => Some(o),
            _ => None,
        }
    }

    /// Parses a whole text: one value, optional white space around it.
    pub fn parse(text: &str) -> Result<Json, JsonError> {
        let mut p = Parser {
            s: text.as_bytes(),
            at: 0,
        };
        p.ws();
        let v = p.value(0)?;
        p.ws();
        if p.at != p.s.len() {
            return Err(p.err("trailing characters"));
        }
        Ok(v)
    }

    /// The compact text QEMU writes (`{"a": 1, "b": [2, 3]}`).
    pub fn to_compact(&self) -> String {
        let mut s = String::new();
        self.write_to(&mut s, None, 0);
        s
    }

    /// An indented rendering (`indent` spaces per level) for people.
    pub fn to_pretty(&self, indent: usize) -> String {
        let mut s = String::new();
        self.write_to(&mut s, Some(indent), 0);
        s
    }

    fn write_to(&self, out: &mut String, indent: Option<usize>, level: usize) {
        let newline = |out: &mut String, level: usize| {
            if let Some(n) = indent {
                out.push('\n');
                for _ in 0..n.saturating_mul(level) {
                    out.push(' ');
                }
            }
        };
        match self {
            Json::Null => out.push_str("null"),
            Json::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            Json::Int(v) => {
                let _ = write!(out, "{v}");
            }
            Json::Float(v) => {
                let _ = write!(out, "{v:?}");
            }
            Json::Str(s) => write_str(out, s),
            Json::Array(items) => {
                out.push('[');
                for (i, v) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                        if indent.is_none() {
                            out.push(' ');
                        }
                    }
                    newline(out, level + 1);
                    v.write_to(out, indent, level + 1);
                }
                if !items.is_empty() {
                    newline(out, level);
                }
                out.push(']');
            }
            Json::Object(pairs) => {
                out.push('{');
                for (i, (k, v)) in pairs.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                        if indent.is_none() {
                            out.push(' ');
                        }
                    }
                    newline(out, level + 1);
                    write_str(out, k);
                    out.push_str(": ");
                    v.write_to(out, indent, level + 1);
                }
                if !pairs.is_empty() {
                    newline(out, level);
                }
                out.push('}');
            }
        }
    }
}

impl fmt::Display for Json {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_compact())
    }
}

/// A quoted string escaped as QEMU's `quoted_str` does.
fn write_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) > 0xffff => {
                let v = c as u32 - 0x10000;
                let _ = write!(
                    out,
                    "\\u{:04X}\\u{:04X}",
                    0xd800 + (v >> 10),
                    0xdc00 + (v & 0x3ff)
                );
            }
            c if (c as u32) < 0x20 || (c as u32) >= 0x7f => {
                let _ = write!(out, "\\u{:04X}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

struct Parser<'a> {
    s: &'a [u8],
    at: usize,
}

impl Parser<'_> {
    fn err(&self, what: &'static str) -> JsonError {
        JsonError {
            offset: self.at,
            what,
        }
    }

    fn peek(&self) -> Option<u8> {
        self.s.get(self.at).copied()
    }

    fn ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.at += 1;
        }
    }

    fn expect(&mut self, c: u8, what: &'static str) -> Result<(), JsonError> {
        if self.peek() == Some(c) {
            self.at += 1;
            Ok(())
        } else {
            Err(self.err(what))
        }
    }

    fn literal(&mut self, word: &[u8], v: Json) -> Result<Json, JsonError> {
        let end = self.at.saturating_add(word.len());
        if self.s.get(self.at..end) == Some(word) {
            self.at = end;
            Ok(v)
        } else {
            Err(self.err("invalid literal"))
        }
    }

    fn value(&mut self, depth: usize) -> Result<Json, JsonError> {
        if depth >= MAX_DEPTH {
            return Err(self.err("nesting too deep"));
        }
        match self.peek() {
            None => Err(self.err("unexpected end")),
            Some(b'{') => self.object(depth),
            Some(b'[') => self.array(depth),
            Some(b'"') => Ok(Json::Str(self.string()?)),
            Some(b't') => self.literal(b"true", Json::Bool(true)),
            Some(b'f') => self.literal(b"false", Json::Bool(false)),
            Some(b'n') => self.literal(b"null", Json::Null),
            Some(b'-' | b'0'..=b'9') => self.number(),
            Some(_) => Err(self.err("unexpected character")),
        }
    }

    fn object(&mut self, depth: usize) -> Result<Json, JsonError> {
        self.at += 1;
        let mut pairs = Vec::new();
        self.ws();
        if self.peek() == Some(b'}') {
            self.at += 1;
            return Ok(Json::Object(pairs));
        }
        loop {
            self.ws();
            if self.peek() != Some(b'"') {
                return Err(self.err("expected a key"));
            }
            let k = self.string()?;
            self.ws();
            self.expect(b':', "expected ':'")?;
            self.ws();
            let v = self.value(depth + 1)?;
            pairs.push((k, v));
            self.ws();
            match self.peek() {
                Some(b',') => self.at += 1,
                Some(b'}') => {
                    self.at += 1;
                    return Ok(Json::Object(pairs));
                }
                _ => return Err(self.err("expected ',' or '}'")),
            }
        }
    }

    fn array(&mut self, depth: usize) -> Result<Json, JsonError> {
        self.at += 1;
        let mut items = Vec::new();
        self.ws();
        if self.peek() == Some(b']') {
            self.at += 1;
            return Ok(Json::Array(items));
        }
        loop {
            self.ws();
            items.push(self.value(depth + 1)?);
            self.ws();
            match self.peek() {
                Some(b',') => self.at += 1,
                Some(b']') => {
                    self.at += 1;
                    return Ok(Json::Array(items));
                }
                _ => return Err(self.err("expected ',' or ']'")),
            }
        }
    }

    fn hex4(&mut self) -> Result<u32, JsonError> {
        let mut v = 0u32;
        for _ in 0..4 {
            let d = match self.peek() {
                Some(c @ b'0'..=b'9') => c - b'0',
                Some(c @ b'a'..=b'f') => c - b'a' + 10,
                Some(c @ b'A'..=b'F') => c - b'A' + 10,
                _ => return Err(self.err("bad \\u escape")),
            };
            v = (v << 4) | u32::from(d);
            self.at += 1;
        }
        Ok(v)
    }

    fn string(&mut self) -> Result<String, JsonError> {
        self.at += 1; // opening quote
        let mut out = String::new();
        loop {
            // Copy a run of plain characters at once (the input is &str, so
            // runs between ASCII delimiters are valid UTF-8).
            let start = self.at;
            while let Some(c) = self.peek() {
                if c == b'"' || c == b'\\' || c < 0x20 {
                    break;
                }
                self.at += 1;
            }
            let run = core::str::from_utf8(&self.s[start..self.at])
                .map_err(|_| self.err("invalid UTF-8"))?;
            out.push_str(run);
            match self.peek() {
                None => return Err(self.err("unterminated string")),
                Some(b'"') => {
                    self.at += 1;
                    return Ok(out);
                }
                Some(b'\\') => {
                    self.at += 1;
                    let c = self.peek().ok_or_else(|| self.err("unterminated string"))?;
                    self.at += 1;
                    match c {
                        b'"' => out.push('"'),
                        b'\\' => out.push('\\'),
                        b'/' => out.push('/'),
                        b'b' => out.push('\u{8}'),
                        b'f' => out.push('\u{c}'),
                        b'n' => out.push('\n'),
                        b'r' => out.push('\r'),
                        b't' => out.push('\t'),
                        b'u' => {
                            let hi = self.hex4()?;
                            let cp = if (0xd800..0xdc00).contains(&hi) {
                                if self.s.get(self.at..self.at.saturating_add(2)) != Some(b"\\u") {
                                    return Err(self.err("lone surrogate"));
                                }
                                self.at += 2;
                                let lo = self.hex4()?;
                                if !(0xdc00..0xe000).contains(&lo) {
                                    return Err(self.err("lone surrogate"));
                                }
                                0x10000 + ((hi - 0xd800) << 10) + (lo - 0xdc00)
                            } else {
                                hi
                            };
                            let ch =
                                char::from_u32(cp).ok_or_else(|| self.err("lone surrogate"))?;
                            out.push(ch);
                        }
                        _ => {
                            self.at -= 1;
                            return Err(self.err("bad escape"));
                        }
                    }
                }
                Some(_) => return Err(self.err("control character in string")),
            }
        }
    }

    fn number(&mut self) -> Result<Json, JsonError> {
        let start = self.at;
        if self.peek() == Some(b'-') {
            self.at += 1;
        }
        let digits = |p: &mut Self| {
            let s = p.at;
            while matches!(p.peek(), Some(b'0'..=b'9')) {
                p.at += 1;
            }
            p.at - s
        };
        let int_start = self.at;
        let n = digits(self);
        if n == 0 {
            return Err(self.err("expected a digit"));
        }
        if n > 1 && self.s.get(int_start) == Some(&b'0') {
            return Err(JsonError {
                offset: int_start,
                what: "leading zero",
            });
        }
        let mut float = false;
        if self.peek() == Some(b'.') {
            self.at += 1;
            float = true;
            if digits(self) == 0 {
                return Err(self.err("expected a digit"));
            }
        }
        if matches!(self.peek(), Some(b'e' | b'E')) {
            self.at += 1;
            float = true;
            if matches!(self.peek(), Some(b'+' | b'-')) {
                self.at += 1;
            }
            if digits(self) == 0 {
                return Err(self.err("expected a digit"));
            }
        }
        // Only ASCII was consumed, so this is valid UTF-8.
        let text = core::str::from_utf8(&self.s[start..self.at]).map_err(|_| JsonError {
            offset: start,
            what: "invalid number",
        })?;
        let bad = JsonError {
            offset: start,
            what: "number out of range",
        };
        if float {
            text.parse::<f64>().map(Json::Float).map_err(|_| bad)
        } else {
            text.parse::<i128>().map(Json::Int).map_err(|_| bad)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;
    use alloc::vec;

    #[test]
    fn compact_matches_qemu_layout() {
        let v = Json::object(vec![
            ("page_size".into(), Json::Int(4096)),
            (
                "devices".into(),
                Json::Array(vec![
                    Json::object(vec![("name".into(), Json::Str("timer".into()))]),
                    Json::Array(vec![]),
                ]),
            ),
        ]);
        assert_eq!(
            v.to_compact(),
            r#"{"page_size": 4096, "devices": [{"name": "timer"}, []]}"#
        );
    }

    #[test]
    fn escapes_as_qemu_quoted_str() {
        let s = Json::Str("a\"b\\c\n\u{1}\u{7f}é😀".into()).to_compact();
        assert_eq!(s, r#""a\"b\\c\n\u0001\u007F\u00E9\uD83D\uDE00""#);
        assert_eq!(
            Json::parse(&s).unwrap(),
            Json::Str("a\"b\\c\n\u{1}\u{7f}é😀".into())
        );
    }

    #[test]
    fn parse_round_trip_and_accessors() {
        let text = r#" {"a": [1, -2, 3.5e1, true, false, null], "b": {"c": "d"}, "e": {}} "#;
        let v = Json::parse(text).unwrap();
        assert_eq!(
            v.get("b").and_then(|b| b.get("c")).and_then(Json::as_str),
            Some("d")
        );
        assert_eq!(
            v.get("a").and_then(Json::as_array).map(|a| a.len()),
            Some(6)
        );
        assert_eq!(
            v.get("a").unwrap().as_array().unwrap()[1].as_i128(),
            Some(-2)
        );
        assert_eq!(v.get("a").unwrap().as_array().unwrap()[1].as_u64(), None);
        assert_eq!(Json::parse(&v.to_compact()).unwrap(), v);
        assert_eq!(Json::parse(&v.to_pretty(4)).unwrap(), v);
    }

    #[test]
    fn errors_carry_offsets() {
        let cases: &[(&str, usize)] = &[
            ("", 0),
            ("{", 1),
            ("{\"a\" 1}", 5),
            ("[1,]", 3),
            ("[1 2]", 3),
            ("\"abc", 4),
            ("\"a\\x\"", 3),
            ("01", 0),
            ("1 x", 2),
            ("\"\\ud800\"", 7),
            ("tru", 0),
            ("-", 1),
        ];
        for &(text, off) in cases {
            let e = Json::parse(text).unwrap_err();
            assert_eq!(e.offset, off, "{text:?}: {e}");
            assert!(e.offset <= text.len());
        }
    }

    #[test]
    fn depth_is_limited() {
        let deep = "[".repeat(MAX_DEPTH + 1) + &"]".repeat(MAX_DEPTH + 1);
        assert_eq!(Json::parse(&deep).unwrap_err().what, "nesting too deep");
        let ok = "[".repeat(MAX_DEPTH - 1) + &"]".repeat(MAX_DEPTH - 1);
        assert!(Json::parse(&ok).is_ok());
        assert_eq!(Json::Int(5).to_string(), "5");
    }
}
