//! Reading resources from YAML files, with errors that name the file, the line and the field.
//!
//! Every input is bounded before it is parsed: a file's size ([`MAX_FILE_BYTES`]), its YAML
//! nesting ([`MAX_DEPTH`], checked by a linear scan because the parser's time is quadratic
//! in it) and its number of documents ([`MAX_DOCUMENTS`]). Which files a directory means is
//! decided in one place, [`policy_files`] (see `files` for the rules).
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::resource::{Document, Resource};

mod batch;
mod depth;
mod files;
pub mod position;
#[cfg(test)]
mod tests;

pub use batch::{Batch, MAX_PROBLEMS_PER_DOCUMENT, Sources, load_batch, parse_into};
pub use depth::MAX_DEPTH;
pub use files::{ChangeDetector, MAX_DIR_DEPTH, MAX_FILE_BYTES, policy_files, read_bounded};

/// Most YAML documents (resources) in one file.
pub const MAX_DOCUMENTS: usize = 10_000;

/// Where a resource came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Origin {
    pub file: PathBuf,
    /// 1-based line of the document's first line.
    pub line: usize,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.file.display(), self.line)
    }
}

#[derive(Clone, Debug)]
pub struct Located {
    pub origin: Origin,
    pub resource: Resource,
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{file}: cannot read: {source}")]
    Read {
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{file}: refused: larger than the limit of {limit} bytes ({} MiB)", limit >> 20)]
    TooLarge { file: PathBuf, limit: u64 },
    #[error("{file}:{line}: refused: YAML nested deeper than the limit of {limit} levels")]
    TooDeep { file: PathBuf, line: usize, limit: usize },
    #[error("{file}:{line}: refused: more than the limit of {limit} YAML documents in one file")]
    TooManyDocuments { file: PathBuf, line: usize, limit: usize },
    #[error("{dir}: refused: directories nested deeper than the limit of {limit} levels")]
    TooDeepTree { dir: PathBuf, limit: usize },
    #[error("{file}:{line}: {message}")]
    Parse { file: PathBuf, line: usize, message: String },
}

/// Reads every resource of every file (a directory: see [`policy_files`]).
pub fn load_paths(paths: &[PathBuf]) -> Result<Vec<Located>, LoadError> {
    let mut out = Vec::new();
    for file in policy_files(paths)? {
        let text = read_bounded(&file)?;
        out.extend(parse_str(&file, &text)?);
    }
    Ok(out)
}

/// Parses a multi-document YAML text. Empty documents are skipped. Stops at the first
/// problem; [`load_batch`] reports them all.
pub fn parse_str(file: &Path, text: &str) -> Result<Vec<Located>, LoadError> {
    depth::check(file, text)?;
    let mut out = Vec::new();
    for (start_line, doc) in split_documents(file, text)? {
        if is_blank(&doc) {
            continue;
        }
        let origin = Origin { file: file.to_path_buf(), line: start_line };
        match batch::read_document(&origin, &doc, 1) {
            Ok(resource) => out.push(Located { origin, resource }),
            Err(findings) => {
                let first = findings.into_iter().next().expect("a refused document has a problem");
                let message = match first.field.is_empty() {
                    true => first.message,
                    false => format!("{}: {}", first.field, first.message),
                };
                return Err(LoadError::Parse { file: first.file, line: first.line, message });
            }
        }
    }
    Ok(out)
}

/// Comments and directives (`%YAML 1.2`) only: nothing to load.
fn is_blank(doc: &str) -> bool {
    doc.lines().all(|l| l.trim().is_empty() || l.trim_start().starts_with('#') || l.starts_with('%'))
}

/// Why one document is not a resource.
enum DocError {
    /// What serde_yaml refused, with its path and position.
    Yaml(serde_yaml::Error),
    /// A well-formed document of an unknown kind or version.
    Semantic { field: String, message: String },
}

/// Reads one document (its text) as a resource of its kind.
fn read_resource(doc: &str) -> Result<Resource, DocError> {
    let Kind { kind, api_version } =
        Kind::deserialize(serde_yaml::Deserializer::from_str(doc)).map_err(DocError::Yaml)?;
    let resource = match kind.as_str() {
        // Kubernetes' own kinds, read with Kubernetes' types (see `crate::k8s`).
        "NetworkPolicy" => crate::k8s::network_policy(doc),
        "Service" => crate::k8s::service(doc),
        "Namespace" if api_version.as_deref() == Some(crate::resource::K8S_CORE_API_VERSION) => {
            crate::k8s::namespace(doc)
        }
        "Workload" => typed(doc, |d: Document<_>| Resource::Workload {
            api_version: d.api_version,
            metadata: d.metadata,
            spec: d.spec,
        }),
        "Namespace" => typed(doc, |d: Document<Option<_>>| Resource::Namespace {
            api_version: d.api_version,
            metadata: d.metadata,
            spec: d.spec.unwrap_or_default(),
        }),
        "SegmentationPolicy" => typed(doc, |d: Document<_>| Resource::SegmentationPolicy {
            api_version: d.api_version,
            metadata: d.metadata,
            spec: d.spec,
        }),
        // The waypoint's kinds (see `crate::waypoint`).
        "HTTPRoute" => crate::waypoint::http_route(doc),
        "Gateway" => crate::waypoint::gateway(doc),
        "AuthorizationPolicy" => crate::waypoint::authorization_policy(doc),
        "TrafficPolicy" => typed(doc, |d: Document<_>| Resource::TrafficPolicy {
            api_version: d.api_version,
            metadata: d.metadata,
            spec: Box::new(d.spec),
        }),
        other => {
            return Err(DocError::Semantic {
                field: "kind".into(),
                message: format!(
                    "unknown kind {other:?} (expected Workload, Namespace, SegmentationPolicy, NetworkPolicy, Service, HTTPRoute, Gateway, AuthorizationPolicy or TrafficPolicy)"
                ),
            });
        }
    }
    .map_err(DocError::Yaml)?;
    if !resource.api_version_accepted() {
        return Err(DocError::Semantic {
            field: "apiVersion".into(),
            message: format!(
                "expected {}, got {:?} ({} {})",
                resource.expected_api_version(),
                resource.api_version(),
                resource.kind(),
                resource.metadata().name
            ),
        });
    }
    Ok(resource)
}

#[derive(Deserialize)]
struct Kind {
    kind: String,
    #[serde(default, rename = "apiVersion")]
    api_version: Option<String>,
}

fn typed<S: serde::de::DeserializeOwned>(
    doc: &str,
    build: impl FnOnce(Document<S>) -> Resource,
) -> Result<Resource, serde_yaml::Error> {
    Document::<S>::deserialize(serde_yaml::Deserializer::from_str(doc)).map(build)
}

/// serde_yaml appends "at line L column C" which we already report in front; drop it.
fn describe_serde_error(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(i) => message[..i].to_string(),
        None => message.to_string(),
    }
}

/// A document marker line (`---` or `...`, alone or followed by a space and more): what
/// follows the marker on its line.
fn document_marker(line: &str) -> Option<(&str, &str)> {
    ["---", "..."].into_iter().find_map(|m| {
        let rest = line.strip_prefix(m)?;
        (rest.is_empty() || rest.starts_with([' ', '\t'])).then_some((m, rest.trim()))
    })
}

/// Splits on document markers, returning each document with its first line number. `---`
/// may be followed by a comment (`--- # web tier`) or by the document's first node
/// (`--- {kind: ...}`); `...` ends a document.
fn split_documents(file: &Path, text: &str) -> Result<Vec<(usize, String)>, LoadError> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut docs = Vec::new();
    let mut current = String::new();
    let mut start = 1;
    for (i, line) in text.lines().enumerate() {
        let Some((marker, rest)) = document_marker(line) else {
            current.push_str(line);
            current.push('\n');
            continue;
        };
        docs.push((start, std::mem::take(&mut current)));
        if docs.len() > MAX_DOCUMENTS {
            return Err(LoadError::TooManyDocuments { file: file.to_path_buf(), line: i + 1, limit: MAX_DOCUMENTS });
        }
        if marker == "---" && !rest.is_empty() && !rest.starts_with('#') {
            // The document starts on the marker's own line.
            start = i + 1;
            current.push_str(rest);
            current.push('\n');
        } else {
            start = i + 2;
        }
    }
    docs.push((start, current));
    Ok(docs)
}
