//! Which files the loader reads, reading them within bounds, and noticing when they change.
//!
//! A directory means its `*.yaml`/`*.yml` files, in name order, and those of its plain
//! subdirectories (recursively, so a tree of files organised by namespace loads as one).
//! Entries whose names start with `.` are skipped: that covers the internals of a Kubernetes
//! ConfigMap mount (`..data`, `..2026_11_25_…`, each a second copy of the visible files, which
//! are symlinks into `..data`) as well as `.git` and editors' hidden files. Symlinks are
//! followed, so the visible names of a ConfigMap mount load once each. `palisade validate`,
//! ztunnel's file mode and the CA's inventory all read through [`policy_files`], so what one
//! accepts the others load.
use std::collections::HashSet;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use super::LoadError;

/// Largest input file read (a policy file of 8 MiB holds tens of thousands of resources).
pub const MAX_FILE_BYTES: u64 = 8 << 20;
/// Deepest directory tree walked below a given directory.
pub const MAX_DIR_DEPTH: usize = 8;
/// A file modified this recently may change again within the file system's timestamp
/// granularity without its size or mtime moving (git's "racy" case), so its content is read
/// rather than trusted from its metadata.
const RACY_WINDOW: Duration = Duration::from_secs(2);

/// Every file the loader reads for `paths`, in load order.
pub fn policy_files(paths: &[PathBuf]) -> Result<Vec<PathBuf>, LoadError> {
    let mut out = Vec::new();
    for path in paths {
        let meta = std::fs::metadata(path).map_err(read_err(path))?;
        if meta.is_dir() {
            let mut visited = HashSet::new();
            walk(path, 0, &mut visited, &mut out)?;
        } else {
            // A file named explicitly is read whatever its name.
            out.push(path.clone());
        }
    }
    Ok(out)
}

fn read_err(path: &Path) -> impl FnOnce(std::io::Error) -> LoadError + '_ {
    move |source| LoadError::Read { file: path.to_path_buf(), source }
}

fn walk(dir: &Path, depth: usize, visited: &mut HashSet<PathBuf>, out: &mut Vec<PathBuf>) -> Result<(), LoadError> {
    // A symlink back to an ancestor would otherwise recurse until the depth limit.
    let canonical = std::fs::canonicalize(dir).map_err(read_err(dir))?;
    if !visited.insert(canonical) {
        return Ok(());
    }
    if depth > MAX_DIR_DEPTH {
        return Err(LoadError::TooDeepTree { dir: dir.to_path_buf(), limit: MAX_DIR_DEPTH });
    }
    let mut entries: Vec<(std::ffi::OsString, PathBuf)> = std::fs::read_dir(dir)
        .map_err(read_err(dir))?
        .map(|e| e.map(|e| (e.file_name(), e.path())))
        .collect::<Result<_, _>>()
        .map_err(read_err(dir))?;
    entries.sort();
    for (name, path) in entries {
        if name.as_encoded_bytes().starts_with(b".") {
            continue;
        }
        let yaml = path.extension().is_some_and(|e| e == "yaml" || e == "yml");
        match std::fs::metadata(&path) {
            Ok(meta) if meta.is_dir() => walk(&path, depth + 1, visited, out)?,
            Ok(_) if yaml => out.push(path),
            Ok(_) => {}
            // A YAML name that cannot be followed (a dangling symlink, a file removed while
            // listing) is an input that went missing: say which.
            Err(source) if yaml => return Err(LoadError::Read { file: path, source }),
            Err(_) => {}
        }
    }
    Ok(())
}

/// Reads a file as UTF-8, refusing more than [`MAX_FILE_BYTES`]. The size is checked before
/// reading, and the read itself is bounded, so a device (`/dev/zero`) or a FIFO that reports no
/// size cannot make the reader grow without end.
pub fn read_bounded(file: &Path) -> Result<String, LoadError> {
    let too_large = || LoadError::TooLarge { file: file.to_path_buf(), limit: MAX_FILE_BYTES };
    let f = std::fs::File::open(file).map_err(read_err(file))?;
    let len = f.metadata().map_err(read_err(file))?.len();
    if len > MAX_FILE_BYTES {
        return Err(too_large());
    }
    let mut bytes = Vec::with_capacity(len as usize);
    f.take(MAX_FILE_BYTES + 1).read_to_end(&mut bytes).map_err(read_err(file))?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(too_large());
    }
    String::from_utf8(bytes).map_err(|e| LoadError::Read {
        file: file.to_path_buf(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, format!("not UTF-8: {e}")),
    })
}

/// What a file looked like to `stat` (following symlinks, so a ConfigMap update that swaps
/// `..data` shows as a new inode).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stat {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Stat {
    fn of(file: &Path) -> Result<Stat, LoadError> {
        let m = std::fs::metadata(file).map_err(read_err(file))?;
        Ok(Stat {
            dev: m.dev(),
            ino: m.ino(),
            len: m.len(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        })
    }

    fn modified_before(&self, t: SystemTime) -> bool {
        let mtime = SystemTime::UNIX_EPOCH
            .checked_add(Duration::new(self.mtime.0.max(0) as u64, self.mtime.1.clamp(0, 999_999_999) as u32));
        mtime.is_some_and(|m| m < t)
    }
}

struct Seen {
    stats: Vec<(PathBuf, Stat)>,
    /// When `stats` were taken.
    taken: SystemTime,
    digest: u64,
}

/// Notices when the loader's input changes, cheaply: each poll lists the files and `stat`s
/// them; contents are read (bounded) only when a file's metadata moved or is too recent to be
/// trusted. Used by ztunnel's reloads and the CA's inventory.
pub struct ChangeDetector {
    paths: Vec<PathBuf>,
    last: Option<Seen>,
}

impl ChangeDetector {
    pub fn new(paths: Vec<PathBuf>) -> Self {
        ChangeDetector { paths, last: None }
    }

    /// Whether the set of files or their contents differ from the previous successful poll
    /// (the first poll says yes). An error names the file; the previous state is kept, so
    /// an input that comes back unchanged is not reported as a change.
    pub fn poll(&mut self) -> Result<bool, LoadError> {
        let taken = SystemTime::now();
        let files = policy_files(&self.paths)?;
        let stats: Vec<(PathBuf, Stat)> =
            files.into_iter().map(|f| Stat::of(&f).map(|s| (f, s))).collect::<Result<_, _>>()?;
        if let Some(last) = &self.last
            && last.stats == stats
            && last.stats.iter().all(|(_, s)| s.modified_before(last.taken - RACY_WINDOW))
        {
            return Ok(false);
        }
        let mut h = DefaultHasher::new();
        for (file, _) in &stats {
            file.hash(&mut h);
            read_bounded(file)?.hash(&mut h);
        }
        let digest = h.finish();
        let changed = self.last.as_ref().is_none_or(|l| l.digest != digest);
        self.last = Some(Seen { stats, taken, digest });
        Ok(changed)
    }
}
