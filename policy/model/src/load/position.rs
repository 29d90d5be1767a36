//! Where a field is in a YAML document: `spec.rules[1].from[0].namespace` → its line.
//!
//! The lookup runs serde_yaml itself (the parser the loader uses, so positions agree exactly
//! with its error positions and nothing is parsed twice differently) along the path only,
//! and stops at the wanted node by failing there: serde_yaml stamps every error with the
//! position of the node being read, which is the only position it hands out. A key is found
//! at the key itself (`namespace:`), a list entry at its first line (`- from: ...`). The
//! document has passed the loader's limits (size, depth, documents) before it gets here, and
//! the walk descends only along the path, so a lookup is one linear parse.
use std::fmt;

use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};

/// The message of the error that marks "found"; no YAML text produces it.
const FOUND: &str = "\u{0}palisade: field found";

/// 1-based line (within `doc`) of the field at `path`, or of the nearest enclosing field
/// that exists (a missing field is reported where it should have been); `None` when not
/// even the first segment is in the document.
pub fn line_of(doc: &str, path: &str) -> Option<usize> {
    let mut path = path;
    loop {
        if path.is_empty() {
            return None;
        }
        if let Some(line) = exact_line(doc, path) {
            return Some(line);
        }
        path = parent(path)?;
    }
}

/// The path without its last segment (`a.b[2]` → `a.b`, `a.b` → `a`, `a` → `None`).
pub fn parent(path: &str) -> Option<&str> {
    let cut = path.rfind(['.', '['])?;
    Some(&path[..cut])
}

fn exact_line(doc: &str, path: &str) -> Option<usize> {
    mark_of(doc, path).map(|(line, _)| line)
}

/// 1-based (line, column) where the node at `path` starts (for a key: the key), if it is there.
fn mark_of(doc: &str, path: &str) -> Option<(usize, usize)> {
    let de = serde_yaml::Deserializer::from_str(doc);
    let found = Find { rest: path }.deserialize(de);
    match found {
        Err(e) if e.to_string().contains(FOUND) => e.location().map(|l| (l.line(), l.column())),
        _ => None,
    }
}

/// Looks for `rest` below the node it is given. `Ok(())`: not there.
struct Find<'p> {
    rest: &'p str,
}

impl<'de> DeserializeSeed<'de> for Find<'_> {
    type Value = ();

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        if self.rest.is_empty() { d.deserialize_any(Hit) } else { d.deserialize_any(Walk { rest: self.rest }) }
    }
}

/// Fails on whatever node it is given: every visit defaults to an `invalid_type` error whose
/// text includes `expecting`, i.e. [`FOUND`].
struct Hit;

impl Visitor<'_> for Hit {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(FOUND)
    }
}

struct Walk<'p> {
    rest: &'p str,
}

impl<'de, 'p> Visitor<'de> for Walk<'p> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a mapping or a sequence")
    }

    // A scalar where the path goes on: not here (a key may be a prefix of a dotted one).
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        Ok(())
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        Ok(())
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        Ok(())
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        Ok(())
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        Ok(())
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(below) = map.next_key_seed(Key { rest: self.rest })? {
            match below {
                Some(rest) => map.next_value_seed(Find { rest })?,
                None => map.next_value::<IgnoredAny>().map(drop)?,
            }
        }
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let Some((index, rest)) = index_segment(self.rest) else {
            while seq.next_element::<IgnoredAny>()?.is_some() {}
            return Ok(());
        };
        let mut i = 0;
        loop {
            let more = if i == index {
                seq.next_element_seed(Find { rest })?.is_some()
            } else {
                seq.next_element::<IgnoredAny>()?.is_some()
            };
            if !more {
                return Ok(());
            }
            i += 1;
        }
    }
}

/// `[3].rest` → `(3, "rest")`.
fn index_segment(path: &str) -> Option<(usize, &str)> {
    let inner = path.strip_prefix('[')?;
    let close = inner.find(']')?;
    let index = inner[..close].parse().ok()?;
    Some((index, below(&inner[close + 1..])?))
}

/// What follows a segment: `""`, `.field…` (without its dot) or `[n]…`.
fn below(after: &str) -> Option<&str> {
    if after.is_empty() || after.starts_with('[') { Some(after) } else { after.strip_prefix('.') }
}

/// Reads a mapping key: fails with [`FOUND`] on the key that ends the path, answers the
/// path below a key that continues it, `None` for any other key.
struct Key<'p> {
    rest: &'p str,
}

impl<'de, 'p> DeserializeSeed<'de> for Key<'p> {
    type Value = Option<&'p str>;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'p> Key<'p> {
    fn key<E: de::Error>(self, key: &str) -> Result<Option<&'p str>, E> {
        match self.rest.strip_prefix(key) {
            Some("") => Err(E::custom(FOUND)),
            Some(after) => Ok(below(after)),
            None => Ok(None),
        }
    }
}

impl<'de, 'p> Visitor<'de> for Key<'p> {
    type Value = Option<&'p str>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a mapping key")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        self.key(v)
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
        self.key(&v.to_string())
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
        self.key(&v.to_string())
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Self::Value, E> {
        self.key(&v.to_string())
    }

    // Any other key (a mapping, a sequence, null) is not on a path.
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(None)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = "\
apiVersion: palisade.dev/v1alpha1
kind: SegmentationPolicy
metadata: {name: p, namespace: a}
spec:
  action: Allow
  rules:
  - from:
    - namespace: b
  - from:
    - {namespace: c}
    - namespace: d
      matchLabels:
        app.kubernetes.io/name: web
    ports: [80, 443]
";

    #[test]
    fn finds_keys_entries_and_flow_nodes() {
        for (path, line) in [
            ("kind", 2),
            ("metadata", 3),
            ("metadata.namespace", 3),
            ("spec", 4),
            ("spec.action", 5),
            ("spec.rules", 6),
            ("spec.rules[0]", 7),
            ("spec.rules[0].from[0].namespace", 8),
            ("spec.rules[1]", 9),
            ("spec.rules[1].from[0].namespace", 10),
            ("spec.rules[1].from[1]", 11),
            ("spec.rules[1].from[1].matchLabels.app.kubernetes.io/name", 13),
            ("spec.rules[1].ports[1]", 14),
        ] {
            assert_eq!(line_of(DOC, path), Some(line), "{path}");
        }
    }

    #[test]
    fn a_missing_field_is_placed_at_its_nearest_parent() {
        assert_eq!(line_of(DOC, "spec.rules[1].from[0].serviceAccount"), Some(10));
        assert_eq!(line_of(DOC, "spec.rules[7].from"), Some(6));
        assert_eq!(line_of(DOC, "spec.egress[0]"), Some(4));
        assert_eq!(line_of(DOC, "status"), None);
        assert_eq!(line_of("", "spec"), None);
        assert_eq!(line_of("[1, 2", "spec"), None, "broken YAML is no position");
    }
}
