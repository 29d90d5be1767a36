//! Loading a batch whole: every file, every document, and every problem of a document, so one
//! run of `palisade validate` (or one rejected reload) names all that is wrong.
//!
//! serde stops at a document's first problem. To find the next one the loader removes the
//! offending node (the unknown key, the bad value, the bad list entry) from the document and
//! reads it again, at most [`MAX_PROBLEMS_PER_DOCUMENT`] times; positions of later problems
//! are looked up in the original text (`position`), with list indices translated back to the
//! original ones. A problem that removal cannot get past (a required field missing) ends the
//! document's list.
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_yaml::Value;

use super::{LoadError, Located, Origin, position};
use crate::validate::Finding;

/// Most problems reported for one document (a generated file gone wrong stays readable).
pub const MAX_PROBLEMS_PER_DOCUMENT: usize = 32;

/// What a batch of files holds: the resources that could be read, the problems of those that
/// could not, and the documents' texts, so later checks can name the line of any field.
#[derive(Debug, Default)]
pub struct Batch {
    pub resources: Vec<Located>,
    /// Problems found while reading (errors only).
    pub findings: Vec<Finding>,
    pub sources: Sources,
}

/// Each document's text by its origin (file and first line).
#[derive(Debug, Default, Clone)]
pub struct Sources(HashMap<(PathBuf, usize), Arc<str>>);

impl Sources {
    pub fn insert(&mut self, origin: &Origin, doc: &str) {
        self.0.insert((origin.file.clone(), origin.line), doc.into());
    }

    /// Where `field` (a path like `spec.rules[1].from[0]`) of the document at `origin` is; the
    /// document's first line when the document or the field is not known.
    pub fn locate(&self, origin: &Origin, field: &str) -> Origin {
        let line = self
            .0
            .get(&(origin.file.clone(), origin.line))
            .and_then(|doc| position::line_of(doc, field))
            .map_or(origin.line, |l| origin.line + l - 1);
        Origin { file: origin.file.clone(), line }
    }
}

/// Reads every file of `paths` (see [`super::policy_files`]); a file that cannot be read, or
/// is refused by a limit, is a finding like any other. Only listing the paths can fail.
pub fn load_batch(paths: &[PathBuf]) -> Result<Batch, LoadError> {
    let mut batch = Batch::default();
    for file in super::policy_files(paths)? {
        match super::read_bounded(&file) {
            Ok(text) => parse_into(&mut batch, &file, &text),
            Err(e) => batch.findings.push(file_finding(e)),
        }
    }
    Ok(batch)
}

/// Adds the resources and problems of one file's text to `batch`.
pub fn parse_into(batch: &mut Batch, file: &Path, text: &str) {
    let docs = match super::depth::check(file, text).and_then(|()| super::split_documents(file, text)) {
        Ok(docs) => docs,
        Err(e) => return batch.findings.push(file_finding(e)),
    };
    for (start_line, doc) in docs {
        if super::is_blank(&doc) {
            continue;
        }
        let origin = Origin { file: file.to_path_buf(), line: start_line };
        batch.sources.insert(&origin, &doc);
        match read_document(&origin, &doc, MAX_PROBLEMS_PER_DOCUMENT) {
            Ok(resource) => batch.resources.push(Located { origin, resource }),
            Err(findings) => {
                let label = label(&doc);
                batch.findings.extend(findings.into_iter().map(|f| Finding { resource: label.clone(), ..f }))
            }
        }
    }
}

/// `Kind namespace/name` of a document that is not a valid resource, as far as it says.
fn label(doc: &str) -> String {
    let Ok(v) = serde_yaml::from_str::<Value>(doc) else { return String::new() };
    let text = |v: Option<&Value>| v.and_then(Value::as_str).unwrap_or_default().to_string();
    let (kind, meta) = (text(v.get("kind")), v.get("metadata"));
    let (ns, name) = (text(meta.and_then(|m| m.get("namespace"))), text(meta.and_then(|m| m.get("name"))));
    match (kind.is_empty(), ns.is_empty()) {
        (true, _) => String::new(),
        (false, true) => format!("{kind} {name}"),
        (false, false) => format!("{kind} {ns}/{name}"),
    }
}

/// A limit or read failure of a whole file, as a finding.
fn file_finding(e: LoadError) -> Finding {
    let (file, line) = match &e {
        LoadError::TooDeep { file, line, .. } | LoadError::TooManyDocuments { file, line, .. } => (file, *line),
        LoadError::Parse { file, line, .. } => (file, *line),
        LoadError::Read { file, .. } | LoadError::TooLarge { file, .. } => (file, 1),
        LoadError::TooDeepTree { dir, .. } => (dir, 1),
    };
    let origin = Origin { file: file.clone(), line };
    // The error names its place in front; the finding carries it apart.
    let text = e.to_string();
    let message = text.strip_prefix(&format!("{origin}: ")).or(text.strip_prefix(&format!("{}: ", file.display())));
    Finding::error(&origin, "", "", message.unwrap_or(&text))
}

/// One document as a resource, or every problem found in it.
/// At most `limit` problems are looked for.
pub(super) fn read_document(
    origin: &Origin,
    doc: &str,
    limit: usize,
) -> Result<crate::resource::Resource, Vec<Finding>> {
    let mut findings: Vec<Finding> = Vec::new();
    let mut current: Option<(Value, String)> = None;
    let mut removed: Vec<(String, usize)> = Vec::new();
    loop {
        let text = current.as_ref().map_or(doc, |(_, t)| t.as_str());
        let e = match super::read_resource(text) {
            Ok(resource) if findings.is_empty() => return Ok(resource),
            Ok(_) => return Err(findings),
            Err(super::DocError::Semantic { field, message }) => {
                let at = locate(origin, doc, &field);
                findings.push(Finding::error(&at, "", &field, message));
                return Err(findings);
            }
            Err(super::DocError::Yaml(e)) => e,
        };
        let (path, message) = split_serde_message(&e.to_string());
        // serde_yaml names the list, not the entry, when an entry's own deserializer refuses
        // it (a bad CIDR in a list); the entry is the one whose text the message quotes.
        let entry = entry_quoted(text, &path, &message);
        let refined = entry.is_some();
        let path = entry.unwrap_or(path);
        let original = translate(&path, &removed);
        let field = match quoted_field(&message) {
            Some(name) if original.is_empty() => name.to_string(),
            Some(name) => format!("{original}.{name}"),
            None => original.clone(),
        };
        let at = match (&current, e.location().filter(|_| !refined)) {
            // The first reading is of the original text: serde's own position is exact.
            (None, Some(l)) => Origin { file: origin.file.clone(), line: origin.line + l.line() - 1 },
            _ => locate(origin, doc, &field),
        };
        let missing = message.starts_with("missing field");
        let repeated = findings.iter().any(|f| f.field == field);
        if !repeated {
            findings.push(Finding::error(&at, "", &field, message.clone()));
        }
        if missing || repeated || findings.len() >= limit {
            return Err(findings);
        }
        // Remove what was wrong and read again.
        let value = match current.take() {
            Some((v, _)) => Some(v),
            None => serde_yaml::from_str::<Value>(doc).ok(),
        };
        let Some(mut value) = value else { return Err(findings) };
        let target = match quoted_field(&message).filter(|_| message.starts_with("unknown field")) {
            Some(name) if path.is_empty() => name.to_string(),
            Some(name) => format!("{path}.{name}"),
            None => path.clone(),
        };
        match remove(&mut value, &target) {
            Some(Some(index)) => {
                let list = parent_of(&target);
                let list_original = translate(list, &removed);
                let index = shift(index, &list_original, &removed);
                removed.push((list_original, index));
            }
            Some(None) => {}
            None => return Err(findings),
        }
        let Ok(text) = serde_yaml::to_string(&value) else { return Err(findings) };
        current = Some((value, text));
    }
}

fn locate(origin: &Origin, doc: &str, field: &str) -> Origin {
    let line = position::line_of(doc, field).map_or(origin.line, |l| origin.line + l - 1);
    Origin { file: origin.file.clone(), line }
}

fn parent_of(path: &str) -> &str {
    position::parent(path).unwrap_or("")
}

/// `path[i]` when `path` is a list and its entry `i` is the string `message` quotes.
fn entry_quoted(doc: &str, path: &str, message: &str) -> Option<String> {
    let quoted = message.split('"').nth(1)?;
    let value: Value = serde_yaml::from_str(doc).ok()?;
    let list = lookup(&value, path)?.as_sequence()?;
    let i = list.iter().position(|v| v.as_str() == Some(quoted))?;
    Some(format!("{path}[{i}]"))
}

/// The node at `path` (a label key may contain dots: the longest key that fits is taken).
fn lookup<'v>(value: &'v Value, path: &str) -> Option<&'v Value> {
    if path.is_empty() {
        return Some(value);
    }
    if let Some(p) = path.strip_prefix('[') {
        let close = p.find(']')?;
        let rest = &p[close + 1..];
        let entry = value.as_sequence()?.get(p[..close].parse::<usize>().ok()?)?;
        return lookup(entry, rest.strip_prefix('.').unwrap_or(rest));
    }
    let map = value.as_mapping()?;
    let key = map
        .keys()
        .filter_map(Value::as_str)
        .filter(|k| path.strip_prefix(*k).is_some_and(|after| after.is_empty() || after.starts_with(['.', '['])))
        .max_by_key(|k| k.len())?;
    let after = &path[key.len()..];
    lookup(map.get(key)?, after.strip_prefix('.').unwrap_or(after))
}

/// serde_yaml writes `path: message at line L column C` (no path at the document's root).
fn split_serde_message(text: &str) -> (String, String) {
    let text = super::describe_serde_error(text);
    match text.split_once(": ") {
        Some((path, message)) if !path.is_empty() && !path.contains(' ') => (path.to_string(), message.to_string()),
        _ => (String::new(), text),
    }
}

/// The field an `unknown field \`x\`` or `missing field \`x\`` message names.
fn quoted_field(message: &str) -> Option<&str> {
    let rest = message.strip_prefix("unknown field `").or_else(|| message.strip_prefix("missing field `"))?;
    rest.split('`').next()
}

/// The original index of the entry now at `index` of the list at `list` (original path),
/// given the entries removed from the lists so far.
fn shift(index: usize, list: &str, removed: &[(String, usize)]) -> usize {
    let mut gone: Vec<usize> = removed.iter().filter(|(l, _)| l == list).map(|(_, i)| *i).collect();
    gone.sort_unstable();
    gone.into_iter().fold(index, |i, g| if g <= i { i + 1 } else { i })
}

/// A path of the edited document as a path of the original one (list entries removed before
/// an index shift it).
fn translate(path: &str, removed: &[(String, usize)]) -> String {
    if removed.is_empty() {
        return path.to_string();
    }
    let mut out = String::new();
    let mut rest = path;
    while let Some(open) = rest.find('[') {
        out.push_str(&rest[..open]);
        let Some(close) = rest[open..].find(']').map(|c| open + c) else { break };
        let Ok(index) = rest[open + 1..close].parse::<usize>() else { break };
        let i = shift(index, &out, removed);
        out.push_str(&format!("[{i}]"));
        rest = &rest[close + 1..];
    }
    out.push_str(rest);
    out
}

/// Removes the node at `path` (current indices). `Some(Some(i))`: entry `i` of a list;
/// `Some(None)`: a mapping key; `None`: no such node.
fn remove(value: &mut Value, path: &str) -> Option<Option<usize>> {
    if let Some((index, rest)) = path.strip_prefix('[').and_then(|p| {
        let close = p.find(']')?;
        Some((p[..close].parse::<usize>().ok()?, &p[close + 1..]))
    }) {
        let list = value.as_sequence_mut()?;
        let rest = rest.strip_prefix('.').unwrap_or(rest);
        if rest.is_empty() {
            (index < list.len()).then(|| list.remove(index))?;
            return Some(Some(index));
        }
        return remove(list.get_mut(index)?, rest);
    }
    let map = value.as_mapping_mut()?;
    // The longest key that starts the path (label keys contain dots).
    let key = map
        .keys()
        .filter_map(Value::as_str)
        .filter(|k| path.strip_prefix(*k).is_some_and(|after| after.is_empty() || after.starts_with(['.', '['])))
        .max_by_key(|k| k.len())?
        .to_string();
    let after = &path[key.len()..];
    if after.is_empty() {
        map.remove(key.as_str())?;
        return Some(None);
    }
    remove(map.get_mut(key.as_str())?, after.strip_prefix('.').unwrap_or(after))
}
