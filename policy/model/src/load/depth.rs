//! A cheap, linear scan of a YAML text's nesting depth, run before the text reaches
//! serde_yaml: the parser's time grows with the square of the nesting (a 200 KB file of
//! brackets kept a core busy for minutes), so deep input is refused before it is parsed.
//!
//! The scan counts block levels (indentation, `- ` entries on one line) plus flow levels
//! (`[`, `{`), skipping quoted scalars, comments and block scalars (`|`, `>`). It does not
//! have to be a YAML parser: it only has to never count less than the parser will nest.
//! Counting more in odd corners is harmless at a limit far above any real resource.
use std::path::Path;

use super::LoadError;

/// Deepest nesting accepted; real resources nest less than ten levels.
pub const MAX_DEPTH: usize = 64;

/// Refuses `text` when it nests deeper than [`MAX_DEPTH`], naming the line where it does.
pub fn check(file: &Path, text: &str) -> Result<(), LoadError> {
    let mut scan = Scan::default();
    for (i, line) in text.lines().enumerate() {
        if let Some(depth) = scan.line(line)
            && depth > MAX_DEPTH
        {
            return Err(LoadError::TooDeep { file: file.to_path_buf(), line: i + 1, limit: MAX_DEPTH });
        }
    }
    Ok(())
}

#[derive(Default)]
struct Scan {
    /// Indentation columns of the open block levels.
    blocks: Vec<usize>,
    /// Open `[` / `{`.
    flow: usize,
    /// Inside a quoted scalar that continues on the next line.
    quote: Option<char>,
    /// Inside a block scalar introduced by a line of this indentation.
    block_scalar: Option<usize>,
    /// Indentation of the line being scanned.
    indent: usize,
}

fn is_space(c: char) -> bool {
    c == ' ' || c == '\t'
}

impl Scan {
    /// Scans one line; returns the deepest nesting reached on it.
    fn line(&mut self, line: &str) -> Option<usize> {
        let indent = line.len() - line.trim_start_matches(' ').len();
        let content = line.trim_start();
        if let Some(parent) = self.block_scalar {
            if content.is_empty() || indent > parent {
                return None;
            }
            self.block_scalar = None;
        }
        self.indent = indent;
        let mut rest = line;
        if self.quote.is_none() && self.flow == 0 {
            if content.is_empty() || content.starts_with('#') {
                return None;
            }
            let marker = ["---", "..."].iter().find_map(|m| line.strip_prefix(m));
            match marker {
                Some(after) if after.is_empty() || after.starts_with(is_space) => {
                    self.blocks.clear();
                    rest = after;
                }
                _ => {
                    while self.blocks.last().is_some_and(|&b| b >= indent) {
                        self.blocks.pop();
                    }
                    self.blocks.push(indent);
                    // `- - x` and `? - x` open a level per indicator on the same line.
                    let mut col = indent;
                    let mut tail = content;
                    while let Some(after) = ["- ", "? "].iter().find_map(|p| tail.strip_prefix(p)) {
                        let skipped = after.len() - after.trim_start().len();
                        col += 2 + skipped;
                        tail = after.trim_start();
                        if tail.is_empty() || tail.starts_with('#') {
                            break;
                        }
                        self.blocks.push(col);
                    }
                    rest = &line[indent..];
                }
            }
        }
        let deepest = self.flow_chars(rest);
        Some(deepest)
    }

    /// Follows quotes, comments and flow brackets through `rest`; returns the deepest level.
    fn flow_chars(&mut self, rest: &str) -> usize {
        let base = self.blocks.len();
        let mut deepest = base + self.flow;
        let mut prev = ' ';
        let mut chars = rest.chars().peekable();
        let mut last_token = String::new();
        while let Some(c) = chars.next() {
            match self.quote {
                Some('\'') => {
                    if c == '\'' {
                        if chars.peek() == Some(&'\'') {
                            chars.next();
                        } else {
                            self.quote = None;
                        }
                    }
                }
                Some(_) => {
                    if c == '\\' {
                        chars.next();
                    } else if c == '"' {
                        self.quote = None;
                    }
                }
                None => match c {
                    '#' if is_space(prev) => break,
                    '\'' | '"' if is_space(prev) || "[{,:-?".contains(prev) => self.quote = Some(c),
                    '[' | '{' => {
                        self.flow += 1;
                        deepest = deepest.max(base + self.flow);
                    }
                    ']' | '}' => self.flow = self.flow.saturating_sub(1),
                    _ => {}
                },
            }
            if self.quote.is_none() && !is_space(c) {
                if is_space(prev) {
                    last_token.clear();
                }
                last_token.push(c);
            }
            prev = c;
        }
        // `key: |` or `- >-`: the more indented lines that follow are text, not structure.
        let indicator =
            last_token.strip_prefix(['|', '>']).is_some_and(|m| m.chars().all(|c| "+-0123456789".contains(c)));
        if self.quote.is_none() && self.flow == 0 && indicator {
            self.block_scalar = Some(self.indent);
        }
        deepest
    }
}
