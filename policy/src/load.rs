//! Reading resources from YAML files, with errors that name the file, the line and the field.
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::resource::{API_VERSION, Document, Resource};

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
    #[error("{file}:{line}: {message}")]
    Parse { file: PathBuf, line: usize, message: String },
}

/// Reads every resource of every file (a directory means its `*.yaml`/`*.yml` files, sorted).
pub fn load_paths(paths: &[PathBuf]) -> Result<Vec<Located>, LoadError> {
    let mut out = Vec::new();
    for path in paths {
        for file in yaml_files(path)? {
            let text =
                std::fs::read_to_string(&file).map_err(|source| LoadError::Read { file: file.clone(), source })?;
            out.extend(parse_str(&file, &text)?);
        }
    }
    Ok(out)
}

fn yaml_files(path: &Path) -> Result<Vec<PathBuf>, LoadError> {
    let read_err = |source| LoadError::Read { file: path.to_path_buf(), source };
    if !path.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(path)
        .map_err(read_err)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    Ok(files)
}

/// Parses a multi-document YAML text. Empty documents are skipped.
pub fn parse_str(file: &Path, text: &str) -> Result<Vec<Located>, LoadError> {
    let mut out = Vec::new();
    for (start_line, doc) in split_documents(text) {
        if doc.lines().all(|l| l.trim().is_empty() || l.trim_start().starts_with('#')) {
            continue;
        }
        let parse_err = |line: usize, message: String| LoadError::Parse { file: file.to_path_buf(), line, message };
        let yaml_err = |e: serde_yaml::Error| {
            let line = e.location().map_or(start_line, |l| start_line + l.line() - 1);
            parse_err(line, describe_serde_error(&e.to_string()))
        };
        let kind = Kind::deserialize(serde_yaml::Deserializer::from_str(&doc)).map_err(yaml_err)?.kind;
        let resource = match kind.as_str() {
            "Workload" => typed(&doc, |d: Document<_>| Resource::Workload {
                api_version: d.api_version,
                metadata: d.metadata,
                spec: d.spec,
            }),
            "Namespace" => typed(&doc, |d: Document<Option<_>>| Resource::Namespace {
                api_version: d.api_version,
                metadata: d.metadata,
                spec: d.spec.unwrap_or_default(),
            }),
            "SegmentationPolicy" => typed(&doc, |d: Document<_>| Resource::SegmentationPolicy {
                api_version: d.api_version,
                metadata: d.metadata,
                spec: d.spec,
            }),
            other => {
                return Err(parse_err(
                    start_line,
                    format!("kind: unknown kind {other:?} (expected Workload, Namespace or SegmentationPolicy)"),
                ));
            }
        }
        .map_err(yaml_err)?;
        if resource.api_version() != API_VERSION {
            return Err(parse_err(
                start_line,
                format!(
                    "apiVersion: expected {API_VERSION}, got {:?} ({} {})",
                    resource.api_version(),
                    resource.kind(),
                    resource.metadata().name
                ),
            ));
        }
        out.push(Located { origin: Origin { file: file.to_path_buf(), line: start_line }, resource });
    }
    Ok(out)
}

#[derive(Deserialize)]
struct Kind {
    kind: String,
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

/// Splits on `---` separator lines, returning each document with its first line number.
fn split_documents(text: &str) -> Vec<(usize, String)> {
    let mut docs = Vec::new();
    let mut current = String::new();
    let mut start = 1;
    for (i, line) in text.lines().enumerate() {
        if line.trim_end() == "---" {
            docs.push((start, std::mem::take(&mut current)));
            start = i + 2;
        } else {
            current.push_str(line);
            current.push('\n');
        }
    }
    docs.push((start, current));
    docs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_file_line_and_field() {
        let text = "apiVersion: palisade.dev/v1alpha1\nkind: Namespace\nmetadata: {name: a}\n---\n\
                    apiVersion: palisade.dev/v1alpha1\nkind: SegmentationPolicy\nmetadata: {name: p, namespace: a}\n\
                    spec:\n  action: Allw\n  rules: []\n";
        let err = parse_str(Path::new("p.yaml"), text).unwrap_err().to_string();
        assert!(err.starts_with("p.yaml:9: "), "{err}");
        assert!(err.contains("Allw"), "{err}");
    }

    #[test]
    fn unknown_field_is_named() {
        let text =
            "apiVersion: palisade.dev/v1alpha1\nkind: Namespace\nmetadata: {name: a}\nspec:\n  defaultActon: Deny\n";
        let err = parse_str(Path::new("n.yaml"), text).unwrap_err().to_string();
        assert!(err.contains("defaultActon") && err.starts_with("n.yaml:5"), "{err}");
    }

    #[test]
    fn wrong_api_version_is_refused() {
        let text = "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n";
        let err = parse_str(Path::new("n.yaml"), text).unwrap_err().to_string();
        assert!(err.contains("apiVersion"), "{err}");
    }
}
