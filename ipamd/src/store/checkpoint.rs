//! The checkpoint: the reference daemon's `vpc-cni-ipam/1` JSON file of assigned addresses
//! (spec/ipamd.md 3.4), written atomically before an assignment is acknowledged.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

/// The only version this daemon (and the reference) reads and writes.
pub const VERSION: &str = "vpc-cni-ipam/1";

/// Pod metadata of an assignment (all fields omitted when empty, as the reference does).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct IpamMetadata {
    /// Pod namespace.
    #[serde(
        rename = "k8sPodNamespace",
        default,
        skip_serializing_if = "String::is_empty"
    )]
    pub pod_namespace: String,
    /// Pod name.
    #[serde(
        rename = "k8sPodName",
        default,
        skip_serializing_if = "String::is_empty"
    )]
    pub pod_name: String,
    /// Interfaces the pod got (multi-NIC); 0 means 1.
    #[serde(rename = "interfacesCount", default, skip_serializing_if = "is_zero")]
    pub interfaces_count: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// One assigned address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Allocation {
    /// CNI network name (`aws-cni`).
    #[serde(rename = "networkName")]
    pub network_name: String,
    /// Sandbox container id.
    #[serde(rename = "containerID")]
    pub container_id: String,
    /// Interface name in the pod (`eth0`).
    #[serde(rename = "ifName")]
    pub if_name: String,
    /// IPv4 address (empty when IPv6).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub ipv4: String,
    /// IPv6 address (empty when IPv4).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub ipv6: String,
    /// Unix nanoseconds of the assignment.
    #[serde(rename = "allocationTimestamp", default)]
    pub allocation_timestamp: i64,
    /// Pod metadata.
    #[serde(default)]
    pub metadata: IpamMetadata,
}

/// The whole file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointFile {
    /// Must be [`VERSION`].
    pub version: String,
    /// Assigned addresses.
    pub allocations: Vec<Allocation>,
}

impl CheckpointFile {
    /// An empty checkpoint of the current version.
    pub fn new(allocations: Vec<Allocation>) -> Self {
        Self {
            version: VERSION.into(),
            allocations,
        }
    }
}

/// A checkpoint read or write failure.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// The file could not be read.
    #[error("reading checkpoint {path}")]
    Read {
        /// File.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid checkpoint JSON; it is kept as it is.
    #[error(
        "checkpoint {path} is corrupt at {field}: {why} (kept untouched; move it away to start from an empty pool)"
    )]
    Corrupt {
        /// File.
        path: PathBuf,
        /// Where in the document: a field path such as `allocations[3].ipv4`, or `.` when
        /// the bytes are not JSON at all.
        field: String,
        /// The parser's message, cut to 256 characters (it quotes the value it refused).
        why: String,
        /// Cause.
        #[source]
        source: serde_json::Error,
    },
    /// The file is larger than any checkpoint this daemon writes ([`MAX_FILE_BYTES`]); it is
    /// kept as it is and not read further.
    #[error("checkpoint {path} is larger than {limit} bytes (kept untouched; move it away to start from an empty pool)")]
    TooLarge {
        /// File.
        path: PathBuf,
        /// The limit.
        limit: u64,
    },
    /// The file has another version; it is kept as it is.
    #[error("checkpoint {path} has version {found:?}, expected {VERSION:?} (kept untouched)")]
    Foreign {
        /// File.
        path: PathBuf,
        /// The version found.
        found: String,
    },
    /// The file could not be written.
    #[error("writing checkpoint {path}")]
    Write {
        /// File.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// The last step of a staged write ([`CheckpointStore::write_staged`]): makes it durable.
pub type FinishWrite = Box<dyn FnOnce() -> Result<(), CheckpointError> + Send>;

/// Where checkpoints go.
pub trait CheckpointStore: Send + Sync {
    /// Reads the checkpoint; `None` when there is none (fresh node).
    fn read(&self) -> Result<Option<CheckpointFile>, CheckpointError>;
    /// Replaces the checkpoint durably.
    fn write(&self, file: &CheckpointFile) -> Result<(), CheckpointError>;
    /// Replaces the checkpoint, leaving the step that makes the replacement durable to the
    /// returned function (for the file: the directory sync after the rename). A later staged
    /// write may begin before an earlier one is finished; each is durable once its finish
    /// returns. The default does the whole write at once.
    fn write_staged(&self, file: &CheckpointFile) -> Result<FinishWrite, CheckpointError> {
        self.write(file)?;
        Ok(Box::new(|| Ok(())))
    }

    /// [`write_staged`](Self::write_staged) of a file already serialised (JSON with its
    /// trailing newline, as [`crate::store::datastore::DataStore::checkpoint_bytes`] makes it). The
    /// default parses it back; the file store writes the bytes as they are.
    fn write_bytes_staged(&self, bytes: &[u8]) -> Result<FinishWrite, CheckpointError> {
        let file = parse(Path::new("<checkpoint bytes>"), bytes)?;
        self.write_staged(&file)
    }
}

/// The checkpoint as a file: temp file in the same directory, fsync, rename, fsync directory.
#[derive(Debug)]
pub struct FileStore {
    path: PathBuf,
    seq: AtomicU64,
}

impl FileStore {
    /// A store at `path` (its directory is created on first write).
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            seq: AtomicU64::new(0),
        }
    }

    /// The file path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Removes temporary files that a write killed before its rename left beside the file
    /// (`<name>.tmp<pid>-<n>`); returns how many. Call at start, before the first write.
    pub fn remove_stale_temps(&self) -> usize {
        let (Some(dir), Some(name)) = (self.path.parent(), self.path.file_name()) else {
            return 0;
        };
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        let prefix = format!("{}.tmp", name.to_string_lossy());
        let Ok(entries) = fs::read_dir(dir) else {
            return 0;
        };
        let mut n = 0;
        for e in entries.flatten() {
            let fname = e.file_name();
            let fname = fname.to_string_lossy();
            let is_ours = fname.strip_prefix(&prefix).is_some_and(|rest| {
                !rest.is_empty() && rest.chars().all(|c| c.is_ascii_digit() || c == '-')
            });
            if is_ours && fs::remove_file(e.path()).is_ok() {
                n += 1;
            }
        }
        n
    }
}

/// The largest checkpoint file read: 32 MiB, over a hundred thousand allocations of the
/// longest names Kubernetes allows, far more than a node holds (a larger file is refused
/// before it is parsed, so a corrupt or hostile file cannot take the daemon's memory).
pub const MAX_FILE_BYTES: u64 = 32 << 20;

/// Only the version, read before the rest (every other field skipped without allocation).
#[derive(Deserialize)]
struct VersionProbe {
    #[serde(default)]
    version: Option<serde_json::Value>,
}

/// Parses checkpoint bytes read from `path`. A malformed document is
/// [`CheckpointError::Corrupt`] naming the field path (`allocations[3].ipv4`).
pub fn parse(path: &Path, bytes: &[u8]) -> Result<CheckpointFile, CheckpointError> {
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(CheckpointError::TooLarge {
            path: path.to_owned(),
            limit: MAX_FILE_BYTES,
        });
    }
    let corrupt = |field: String, source: serde_json::Error| {
        let text = source.to_string();
        let mut why: String = text.chars().take(256).collect();
        if why.len() < text.len() {
            why.push('…');
        }
        CheckpointError::Corrupt {
            path: path.to_owned(),
            field,
            why,
            source,
        }
    };
    // Check the version first, so that a file of another version is "foreign" even when its
    // allocations have another shape.
    let probe: VersionProbe = deserialize_at(bytes).map_err(|(f, e)| corrupt(f, e))?;
    let found = match &probe.version {
        Some(serde_json::Value::String(s)) => s.as_str(),
        _ => "",
    };
    if found != VERSION {
        return Err(CheckpointError::Foreign {
            path: path.to_owned(),
            found: found.to_owned(),
        });
    }
    deserialize_at(bytes).map_err(|(f, e)| corrupt(f, e))
}

/// Deserialises `bytes`, naming the field path of a failure (`.` for the document itself).
fn deserialize_at<T: serde::de::DeserializeOwned>(
    bytes: &[u8],
) -> Result<T, (String, serde_json::Error)> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let field = e.path().to_string();
        (field, e.into_inner())
    })?;
    de.end().map_err(|e| (".".to_owned(), e))?;
    Ok(value)
}

impl FileStore {
    /// Writes `file` to a temporary file beside the checkpoint, syncs it and renames it over
    /// the checkpoint; returns the directory to sync.
    fn write_and_rename(&self, file: &CheckpointFile) -> Result<PathBuf, CheckpointError> {
        let mut bytes = serde_json::to_vec(file).map_err(|e| CheckpointError::Write {
            path: self.path.clone(),
            source: e.into(),
        })?;
        bytes.push(b'\n');
        self.write_and_rename_bytes(&bytes)
    }

    /// Writes `bytes` to a temporary file beside the checkpoint, syncs it and renames it over
    /// the checkpoint; returns the directory to sync.
    fn write_and_rename_bytes(&self, bytes: &[u8]) -> Result<PathBuf, CheckpointError> {
        let werr = |source| CheckpointError::Write {
            path: self.path.clone(),
            source,
        };
        let dir = self
            .path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_owned();
        fs::create_dir_all(&dir).map_err(werr)?;
        let name = self
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "ipam.json".into());
        let tmp = dir.join(format!(
            "{name}.tmp{}-{}",
            std::process::id(),
            self.seq.fetch_add(1, Ordering::Relaxed)
        ));
        let res = (|| {
            let mut f = fs::File::create(&tmp)?;
            f.write_all(bytes)?;
            f.sync_all()?;
            drop(f);
            crate::failpoint::hit(crate::failpoint::CHECKPOINT_BEFORE_RENAME);
            fs::rename(&tmp, &self.path)
        })();
        if res.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        res.map_err(werr)?;
        Ok(dir)
    }

    fn sync_dir(path: &Path, dir: &Path) -> Result<(), CheckpointError> {
        crate::failpoint::hit(crate::failpoint::CHECKPOINT_BEFORE_DIR_SYNC);
        fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|source| CheckpointError::Write {
                path: path.to_owned(),
                source,
            })
    }
}

impl CheckpointStore for FileStore {
    fn read(&self) -> Result<Option<CheckpointFile>, CheckpointError> {
        let rerr = |source| CheckpointError::Read {
            path: self.path.clone(),
            source,
        };
        let f = match fs::File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(rerr(source)),
        };
        // Read at most one byte past the limit: a huge file (or a device that never ends)
        // is refused without being read whole.
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut std::io::Read::take(f, MAX_FILE_BYTES + 1), &mut bytes)
            .map_err(rerr)?;
        parse(&self.path, &bytes).map(Some)
    }

    fn write(&self, file: &CheckpointFile) -> Result<(), CheckpointError> {
        let dir = self.write_and_rename(file)?;
        Self::sync_dir(&self.path, &dir)
    }

    fn write_staged(&self, file: &CheckpointFile) -> Result<FinishWrite, CheckpointError> {
        let dir = self.write_and_rename(file)?;
        let path = self.path.clone();
        Ok(Box::new(move || Self::sync_dir(&path, &dir)))
    }

    fn write_bytes_staged(&self, bytes: &[u8]) -> Result<FinishWrite, CheckpointError> {
        let dir = self.write_and_rename_bytes(bytes)?;
        let path = self.path.clone();
        Ok(Box::new(move || Self::sync_dir(&path, &dir)))
    }
}

/// An in-memory store; writes can be made to fail.
#[derive(Debug, Default)]
pub struct MemoryStore {
    state: Mutex<(Option<CheckpointFile>, bool, u64)>,
}

impl MemoryStore {
    /// A store holding `file`.
    pub fn with(file: Option<CheckpointFile>) -> Self {
        Self {
            state: Mutex::new((file, false, 0)),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (Option<CheckpointFile>, bool, u64)> {
        match self.state.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// Makes every following write fail (or succeed again).
    pub fn set_failing(&self, failing: bool) {
        self.lock().1 = failing;
    }

    /// The last written file.
    pub fn current(&self) -> Option<CheckpointFile> {
        self.lock().0.clone()
    }

    /// Successful writes so far.
    pub fn writes(&self) -> u64 {
        self.lock().2
    }
}

impl CheckpointStore for MemoryStore {
    fn read(&self) -> Result<Option<CheckpointFile>, CheckpointError> {
        Ok(self.lock().0.clone())
    }

    fn write(&self, file: &CheckpointFile) -> Result<(), CheckpointError> {
        let mut g = self.lock();
        if g.1 {
            return Err(CheckpointError::Write {
                path: PathBuf::from("<memory>"),
                source: std::io::Error::other("injected write failure"),
            });
        }
        g.0 = Some(file.clone());
        g.2 += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file as the reference daemon writes it (Go `encoding/json`, compact, trailing newline).
    const REFERENCE: &str = concat!(
        r#"{"version":"vpc-cni-ipam/1","allocations":["#,
        r#"{"networkName":"aws-cni","containerID":"4c1d5bd1c2a3","ifName":"eth0","ipv4":"10.0.1.23","allocationTimestamp":1700000000000000000,"metadata":{"k8sPodNamespace":"default","k8sPodName":"web-0","interfacesCount":1}},"#,
        r#"{"networkName":"_migrated-from-cri","containerID":"9f00","ifName":"unknown","ipv4":"10.0.1.24","allocationTimestamp":1700000000000000001,"metadata":{}}"#,
        "]}\n"
    );

    #[test]
    fn reads_the_reference_format_and_writes_it_back_byte_for_byte() {
        let f = parse(Path::new("x"), REFERENCE.as_bytes()).unwrap();
        assert_eq!(f.allocations.len(), 2);
        assert_eq!(f.allocations[0].metadata.pod_name, "web-0");
        assert_eq!(
            f.allocations[0].allocation_timestamp,
            1_700_000_000_000_000_000
        );
        assert_eq!(f.allocations[1].metadata, IpamMetadata::default());
        let mut out = serde_json::to_string(&f).unwrap();
        out.push('\n');
        assert_eq!(out, REFERENCE);
    }

    #[test]
    fn foreign_and_corrupt_files_are_errors() {
        let p = Path::new("/x/ipam.json");
        assert!(matches!(
            parse(p, br#"{"version":"vpc-cni-ipam/2","allocations":[]}"#),
            Err(CheckpointError::Foreign { .. })
        ));
        assert!(matches!(
            parse(p, br#"{"allocations":[]}"#),
            Err(CheckpointError::Foreign { .. })
        ));
        assert!(matches!(
            parse(p, b"{\"version\":\"vpc-cni-ipam/1\",\"allocations\":[{"),
            Err(CheckpointError::Corrupt { .. })
        ));
        assert!(matches!(
            parse(
                p,
                br#"{"version":"vpc-cni-ipam/1","allocations":[{"ipv4":"10.0.0.1"}]}"#
            ),
            Err(CheckpointError::Corrupt { .. })
        ));
    }

    #[test]
    fn file_store_round_trip_and_missing_file() {
        let dir = tempfile::tempdir().unwrap();
        let s = FileStore::new(dir.path().join("sub/ipam.json"));
        assert!(s.read().unwrap().is_none());
        let f = parse(Path::new("x"), REFERENCE.as_bytes()).unwrap();
        s.write(&f).unwrap();
        assert_eq!(s.read().unwrap(), Some(f.clone()));
        assert_eq!(
            fs::read_to_string(s.path()).unwrap(),
            REFERENCE,
            "same bytes as the reference"
        );
        // No temp files left behind.
        let names: Vec<_> = fs::read_dir(dir.path().join("sub"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1);
    }

    #[test]
    fn stale_temporary_files_of_a_killed_write_are_removed_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("ipam.json");
        fs::write(&p, REFERENCE).unwrap();
        fs::write(dir.path().join("ipam.json.tmp123-4"), b"{").unwrap();
        fs::write(dir.path().join("ipam.json.tmp9-0"), b"").unwrap();
        fs::write(dir.path().join("ipam.json.tmpx"), b"keep").unwrap();
        fs::write(dir.path().join("other.json.tmp1-1"), b"keep").unwrap();
        let s = FileStore::new(&p);
        assert_eq!(s.remove_stale_temps(), 2);
        let mut names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["ipam.json", "ipam.json.tmpx", "other.json.tmp1-1"]);
        assert_eq!(fs::read_to_string(&p).unwrap(), REFERENCE);
    }

    #[test]
    fn a_corrupt_file_is_kept_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("ipam.json");
        fs::write(&p, b"garbage").unwrap();
        let s = FileStore::new(&p);
        let e = s.read().unwrap_err();
        assert!(e.to_string().contains("corrupt"), "{e}");
        assert_eq!(fs::read(&p).unwrap(), b"garbage");
    }
}
