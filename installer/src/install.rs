//! Atomic file installation into host directories (CNI bin dir, CNI conf dir).
//!
//! A file is written to a hidden temporary file in the target directory, flushed to disk,
//! given its final mode, renamed over the target and the directory is synced. A reader of the
//! target path (kubelet, the container runtime executing a plugin) sees either the previous
//! complete file or the new complete file, never a partial one. Renaming also replaces a
//! binary that is being executed (writing into it would fail with `ETXTBSY`).

use std::fs::{File, OpenOptions, Permissions};
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use crate::error::InstallerError;

static TEMP_COUNTER: AtomicU32 = AtomicU32::new(0);

fn io_err<'a>(
    op: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> InstallerError + 'a {
    move |source| InstallerError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// Writes `contents` to `dir/name` atomically with permission bits `mode`, replacing any
/// existing file. Returns the target path.
pub fn write_atomic(
    dir: &Path,
    name: &str,
    contents: &mut dyn Read,
    mode: u32,
) -> Result<PathBuf, InstallerError> {
    if name.is_empty() || name.contains('/') || name == "." || name == ".." {
        return Err(InstallerError::BadName(name.to_owned()));
    }
    let target = dir.join(name);
    let tmp = dir.join(format!(
        ".{name}.tmp-{}-{}",
        std::process::id(),
        TEMP_COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io_err("create", &tmp))?;
        std::io::copy(contents, &mut file).map_err(io_err("write", &tmp))?;
        file.flush().map_err(io_err("write", &tmp))?;
        file.set_permissions(Permissions::from_mode(mode & 0o7777))
            .map_err(io_err("chmod", &tmp))?;
        file.sync_all().map_err(io_err("fsync", &tmp))?;
        drop(file);
        std::fs::rename(&tmp, &target).map_err(io_err("rename into place", &target))
    })();
    if result.is_err() {
        // Best effort: do not leave a half-written temporary behind.
        let _ = std::fs::remove_file(&tmp);
    }
    result?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("fsync directory", dir))?;
    Ok(target)
}

/// Copies the regular file `src` into `dir` (same file name) atomically, keeping its
/// permission bits. Returns the target path.
pub fn copy_atomic(src: &Path, dir: &Path) -> Result<PathBuf, InstallerError> {
    let name = src
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| InstallerError::BadName(src.display().to_string()))?;
    let mut file = File::open(src).map_err(io_err("open", src))?;
    let meta = file.metadata().map_err(io_err("stat", src))?;
    if !meta.is_file() {
        return Err(InstallerError::NotAFile(src.to_path_buf()));
    }
    write_atomic(dir, name, &mut file, meta.permissions().mode())
}

/// Copies every regular file of `src_dir` into `dst_dir` atomically (modes kept), except the
/// file that is `skip` (the installer's own binary when it lives there) and hidden files.
/// Returns the installed paths, sorted.
pub fn copy_dir_files(
    src_dir: &Path,
    dst_dir: &Path,
    skip: Option<&Path>,
) -> Result<Vec<PathBuf>, InstallerError> {
    let skip_id = skip
        .and_then(|p| std::fs::metadata(p).ok())
        .map(|m| (m.dev(), m.ino()));
    let mut sources = Vec::new();
    for entry in std::fs::read_dir(src_dir).map_err(io_err("read directory", src_dir))? {
        let entry = entry.map_err(io_err("read directory", src_dir))?;
        let path = entry.path();
        let hidden = entry.file_name().to_string_lossy().starts_with('.');
        // Follows symlinks: a link to a plugin installs the plugin.
        let Ok(meta) = std::fs::metadata(&path) else {
            continue;
        };
        if hidden || !meta.is_file() || Some((meta.dev(), meta.ino())) == skip_id {
            continue;
        }
        sources.push(path);
    }
    sources.sort();
    sources
        .iter()
        .map(|src| copy_atomic(src, dst_dir))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_file(path: &Path, contents: &[u8], mode: u32) {
        std::fs::write(path, contents).unwrap();
        std::fs::set_permissions(path, Permissions::from_mode(mode)).unwrap();
    }

    fn mode_of(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
    }

    fn names_in(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn copy_keeps_content_and_mode_and_leaves_no_temporary() {
        let src = tempfile::tempdir().unwrap();
        let dst = tempfile::tempdir().unwrap();
        write_file(&src.path().join("aws-cni"), b"\x7fELF plugin", 0o755);
        write_file(&src.path().join("secret-tool"), b"private", 0o700);
        let installed = copy_dir_files(src.path(), dst.path(), None).unwrap();
        assert_eq!(
            installed,
            vec![dst.path().join("aws-cni"), dst.path().join("secret-tool")]
        );
        assert_eq!(
            std::fs::read(dst.path().join("aws-cni")).unwrap(),
            b"\x7fELF plugin"
        );
        assert_eq!(mode_of(&dst.path().join("aws-cni")), 0o755);
        assert_eq!(mode_of(&dst.path().join("secret-tool")), 0o700);
        assert_eq!(names_in(dst.path()), vec!["aws-cni", "secret-tool"]);
    }

    #[test]
    fn copy_replaces_an_existing_read_only_binary() {
        let src = tempfile::tempdir().unwrap();
        let dst = tempfile::tempdir().unwrap();
        write_file(&dst.path().join("portmap"), b"old version", 0o555);
        write_file(&src.path().join("portmap"), b"new version", 0o755);
        copy_atomic(&src.path().join("portmap"), dst.path()).unwrap();
        assert_eq!(
            std::fs::read(dst.path().join("portmap")).unwrap(),
            b"new version"
        );
        assert_eq!(mode_of(&dst.path().join("portmap")), 0o755);
        assert_eq!(names_in(dst.path()), vec!["portmap"]);
    }

    #[test]
    fn copy_dir_skips_itself_directories_and_hidden_files() {
        let src = tempfile::tempdir().unwrap();
        let dst = tempfile::tempdir().unwrap();
        write_file(&src.path().join("vpc-cni-install"), b"me", 0o755);
        write_file(&src.path().join("bandwidth"), b"bw", 0o755);
        write_file(&src.path().join(".hidden"), b"h", 0o644);
        std::fs::create_dir(src.path().join("subdir")).unwrap();
        std::os::unix::fs::symlink(
            src.path().join("bandwidth"),
            src.path().join("bandwidth-link"),
        )
        .unwrap();
        copy_dir_files(
            src.path(),
            dst.path(),
            Some(&src.path().join("vpc-cni-install")),
        )
        .unwrap();
        assert_eq!(names_in(dst.path()), vec!["bandwidth", "bandwidth-link"]);
        assert!(
            std::fs::symlink_metadata(dst.path().join("bandwidth-link"))
                .unwrap()
                .file_type()
                .is_file(),
            "a symlinked plugin is installed as a regular file"
        );
    }

    #[test]
    fn a_failed_copy_keeps_the_old_file_and_no_temporary() {
        let dst = tempfile::tempdir().unwrap();
        write_file(&dst.path().join("aws-cni"), b"old", 0o755);
        struct Failing(usize);
        impl Read for Failing {
            fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
                if self.0 == 0 {
                    return Err(std::io::Error::other("source vanished"));
                }
                self.0 -= 1;
                buf[0] = b'x';
                Ok(1)
            }
        }
        let err = write_atomic(dst.path(), "aws-cni", &mut Failing(3), 0o755).unwrap_err();
        assert!(
            matches!(err, InstallerError::Io { op: "write", .. }),
            "{err}"
        );
        assert_eq!(std::fs::read(dst.path().join("aws-cni")).unwrap(), b"old");
        assert_eq!(names_in(dst.path()), vec!["aws-cni"]);
    }

    #[test]
    fn names_with_slashes_are_refused() {
        let dst = tempfile::tempdir().unwrap();
        let err = write_atomic(dst.path(), "../escape", &mut &b""[..], 0o644).unwrap_err();
        assert!(matches!(err, InstallerError::BadName(_)));
    }

    /// A reader polling the target while a large file replaces it only ever sees the old or
    /// the new complete contents.
    #[test]
    fn a_concurrent_reader_never_sees_a_partial_file() {
        let dst = tempfile::tempdir().unwrap();
        let old = vec![b'o'; 4 << 20];
        let new = vec![b'n'; 4 << 20];
        std::fs::write(dst.path().join("aws-cni"), &old).unwrap();
        let target = dst.path().join("aws-cni");
        let stop = std::sync::atomic::AtomicBool::new(false);
        let (seen_old, seen_new) = std::thread::scope(|s| {
            let reader = s.spawn(|| {
                let (mut seen_old, mut seen_new) = (0u32, 0u32);
                loop {
                    let done = stop.load(Ordering::SeqCst);
                    let got = std::fs::read(&target).unwrap();
                    if got == old {
                        seen_old += 1;
                    } else if got == new {
                        seen_new += 1;
                    } else {
                        panic!("partial file of {} bytes", got.len());
                    }
                    if done {
                        return (seen_old, seen_new);
                    }
                }
            });
            for i in 0..6 {
                let data = if i % 2 == 0 { &new } else { &old };
                write_atomic(dst.path(), "aws-cni", &mut &data[..], 0o755).unwrap();
            }
            write_atomic(dst.path(), "aws-cni", &mut &new[..], 0o755).unwrap();
            stop.store(true, Ordering::SeqCst);
            reader.join().unwrap()
        });
        assert!(seen_new >= 1, "the last read sees the new file");
        assert!(seen_old + seen_new >= 1);
        assert_eq!(names_in(dst.path()), vec!["aws-cni"]);
    }
}
