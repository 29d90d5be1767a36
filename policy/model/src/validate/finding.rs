//! One thing validation found: an error (the batch is refused) or a warning (the batch is
//! accepted, and what it says is not, or not yet, enforced as written). Both name the file,
//! the line of the field itself (not of its resource's first line) and the field's path.
use std::fmt;
use std::path::PathBuf;

use crate::load::Origin;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Severity {
    Error,
    Warning,
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Severity::Error => "error",
            Severity::Warning => "warning",
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    pub severity: Severity,
    pub file: PathBuf,
    /// 1-based line of the field (of the document when the field cannot be found in it).
    pub line: usize,
    /// `Kind namespace/name`; empty when the document could not be read as a resource.
    pub resource: String,
    /// Path of the field, e.g. `spec.rules[1].from[0].namespace`; empty for the whole document.
    pub field: String,
    pub message: String,
}

impl Finding {
    pub fn error(origin: &Origin, resource: &str, field: &str, message: impl Into<String>) -> Finding {
        Finding::new(Severity::Error, origin, resource, field, message)
    }

    pub fn warning(origin: &Origin, resource: &str, field: &str, message: impl Into<String>) -> Finding {
        Finding::new(Severity::Warning, origin, resource, field, message)
    }

    fn new(severity: Severity, origin: &Origin, resource: &str, field: &str, message: impl Into<String>) -> Finding {
        Finding {
            severity,
            file: origin.file.clone(),
            line: origin.line,
            resource: resource.to_string(),
            field: field.to_string(),
            message: message.into(),
        }
    }

    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }

    /// Where the finding is, `file:line`.
    pub fn origin(&self) -> Origin {
        Origin { file: self.file.clone(), line: self.line }
    }

    /// Order for reports: by file, line, then errors before warnings.
    pub fn sort_key(&self) -> (&PathBuf, usize, Severity, &str) {
        (&self.file, self.line, self.severity, &self.field)
    }
}

/// `file:line: resource: field: message`, with `warning: ` in front of warnings (an error
/// reads as before warnings existed, so logs and scripts that match it keep working).
impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: ", self.file.display(), self.line)?;
        if self.severity == Severity::Warning {
            f.write_str("warning: ")?;
        }
        for part in [&self.resource, &self.field] {
            if !part.is_empty() {
                write!(f, "{part}: ")?;
            }
        }
        f.write_str(&self.message)
    }
}
