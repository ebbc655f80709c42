//! Network namespaces: open by path, enter with an RAII guard, run a closure on a dedicated
//! thread inside a namespace, and create/delete named namespaces (`ip netns add` semantics).
//!
//! Namespace hygiene (ARCHITECTURE.md style rule 7): a thread enters a namespace only through
//! [`NetnsGuard`], which is `!Send` so it cannot leave the thread it was made on, and restores
//! the original namespace on drop. Work that must happen "inside" a namespace (creating a
//! netlink socket, touching /proc/sys/net, running iptables) goes through [`Netns::run`] or
//! [`Netns::run_async`], which use a fresh OS thread that exits afterwards, so an async runtime's
//! worker threads are never left in the wrong namespace.

use std::fs::File;
use std::marker::PhantomData;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nix::sched::{setns, unshare, CloneFlags};

use crate::error::{NetError, Result};

/// Where named namespaces are bind-mounted (iproute2's `NETNS_RUN_DIR`).
pub const NETNS_RUN_DIR: &str = "/var/run/netns";

/// The calling thread's own network namespace.
const THREAD_SELF_NS: &str = "/proc/thread-self/ns/net";

fn nix_io(e: nix::Error) -> std::io::Error {
    std::io::Error::from_raw_os_error(e as i32)
}

/// An open network namespace (a file descriptor on its nsfs inode), and the path it came from.
#[derive(Debug)]
pub struct Netns {
    file: File,
    path: PathBuf,
}

impl Netns {
    /// Opens a namespace by path: `/var/run/netns/NAME`, `/proc/PID/ns/net`, or a runtime's
    /// bind mount (`CNI_NETNS`).
    pub fn open(path: impl AsRef<Path>) -> Result<Netns> {
        let path = path.as_ref().to_path_buf();
        let file = File::open(&path).map_err(|source| NetError::Netns {
            op: "open",
            path: path.clone(),
            source,
        })?;
        // A namespace file lives on nsfs; anything else (a stale bind-mount target, a
        // regular file) is refused here, before any work is done in its name.
        let fs = nix::sys::statfs::fstatfs(&file).map_err(|e| NetError::Netns {
            op: "statfs",
            path: path.clone(),
            source: std::io::Error::from(e),
        })?;
        if fs.filesystem_type() != nix::sys::statfs::NSFS_MAGIC {
            return Err(NetError::Netns {
                op: "open",
                path: path.clone(),
                source: std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "not a network namespace (the file is not on nsfs)",
                ),
            });
        }
        Ok(Netns { file, path })
    }

    /// Opens the named namespace `/var/run/netns/NAME`.
    pub fn named(name: &str) -> Result<Netns> {
        Netns::open(named_path(name)?)
    }

    /// Opens the network namespace of process `pid`.
    pub fn of_pid(pid: u32) -> Result<Netns> {
        Netns::open(format!("/proc/{pid}/ns/net"))
    }

    /// Opens the calling thread's current network namespace.
    pub fn current() -> Result<Netns> {
        Netns::open(THREAD_SELF_NS)
    }

    /// The path the namespace was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A second handle on the same namespace (a duplicated descriptor).
    pub fn try_clone(&self) -> Result<Netns> {
        let file = self.file.try_clone().map_err(|source| NetError::Netns {
            op: "dup",
            path: self.path.clone(),
            source,
        })?;
        Ok(Netns {
            file,
            path: self.path.clone(),
        })
    }

    /// The namespace's identity (device and inode of its nsfs file): equal ids mean the same
    /// namespace.
    pub fn id(&self) -> Result<(u64, u64)> {
        let m = self.file.metadata().map_err(|source| NetError::Netns {
            op: "stat",
            path: self.path.clone(),
            source,
        })?;
        Ok((m.dev(), m.ino()))
    }

    /// True when the calling thread is in this namespace.
    pub fn is_current(&self) -> Result<bool> {
        Ok(Netns::current()?.id()? == self.id()?)
    }

    /// Moves the calling thread into this namespace until the returned guard is dropped.
    ///
    /// Prefer [`Netns::run`]: a guard on an async runtime's worker thread would leak the
    /// namespace into unrelated tasks if the task yielded while it is held (the guard is `!Send`,
    /// which keeps it out of `Send` futures).
    pub fn enter(&self) -> Result<NetnsGuard> {
        let original = Netns::current()?;
        setns(self.file.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|e| NetError::Netns {
            op: "enter",
            path: self.path.clone(),
            source: nix_io(e),
        })?;
        Ok(NetnsGuard {
            original,
            _not_send: PhantomData,
        })
    }

    /// Runs `f` inside this namespace on a dedicated OS thread and returns its result.
    ///
    /// The thread is created for the call and exits afterwards, so no pooled or runtime thread
    /// ever changes namespace. Blocks the caller until `f` returns. When the calling thread is
    /// already in this namespace, `f` runs on it directly: no thread, no namespace switch.
    pub fn run<F, R>(&self, f: F) -> Result<R>
    where
        F: FnOnce() -> R + Send,
        R: Send,
    {
        if self.is_current()? {
            // Already here (e.g. the plugin's own host namespace): no thread, no switch.
            return std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|_| {
                NetError::Thread {
                    what: format!("panicked inside {}", self.path.display()),
                }
            });
        }
        std::thread::scope(|s| {
            let worker = std::thread::Builder::new()
                .name("netns".into())
                .spawn_scoped(s, || {
                    let _guard = self.enter()?;
                    Ok(f())
                })
                .map_err(|e| NetError::Thread {
                    what: format!("spawn: {e}"),
                })?;
            worker.join().map_err(|_| NetError::Thread {
                what: format!("panicked inside {}", self.path.display()),
            })?
        })
    }

    /// Like [`Netns::run`], but awaits the dedicated thread instead of blocking, for use on an
    /// async runtime.
    pub async fn run_async<F, R>(&self, f: F) -> Result<R>
    where
        F: FnOnce() -> R + Send + 'static,
        R: Send + 'static,
    {
        let ns = self.try_clone()?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name("netns".into())
            .spawn(move || {
                let r = ns.enter().map(|_guard| f());
                let _ = tx.send(r);
            })
            .map_err(|e| NetError::Thread {
                what: format!("spawn: {e}"),
            })?;
        rx.await.map_err(|_| NetError::Thread {
            what: format!("panicked inside {}", self.path.display()),
        })?
    }
}

impl AsFd for Netns {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

/// Keeps the current thread in another network namespace; restores the original one on drop.
///
/// Not `Send`: it must be dropped on the thread that created it.
#[derive(Debug)]
pub struct NetnsGuard {
    original: Netns,
    _not_send: PhantomData<*const ()>,
}

impl Drop for NetnsGuard {
    fn drop(&mut self) {
        if let Err(e) = setns(self.original.file.as_fd(), CloneFlags::CLONE_NEWNET) {
            // A thread that cannot return to its namespace would carry on doing host work in
            // the wrong one; there is no safe way to continue.
            tracing::error!(error = %e, "cannot restore the original network namespace; aborting");
            std::process::abort();
        }
    }
}

fn named_path(name: &str) -> Result<PathBuf> {
    if name.is_empty()
        || name == "."
        || name == ".."
        || name.contains('/')
        || name.contains('\0')
        || name.len() > 255
    {
        return Err(NetError::invalid(format!("netns name {name:?}")));
    }
    Ok(Path::new(NETNS_RUN_DIR).join(name))
}

/// Creates a new, empty network namespace named `name` and pins it with a bind mount on
/// `/var/run/netns/NAME`, like `ip netns add NAME`. Fails if the name is taken.
pub fn create_named(name: &str) -> Result<Netns> {
    let path = named_path(name)?;
    let err = |op, source| NetError::Netns {
        op,
        path: path.clone(),
        source,
    };
    std::fs::create_dir_all(NETNS_RUN_DIR).map_err(|e| err("create", e))?;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(|e| err("create", e))?;
    // A fresh thread unshares its network namespace and bind-mounts it; the thread then exits,
    // and the mount keeps the namespace alive.
    let target = path.clone();
    let made = std::thread::Builder::new()
        .name("netns-create".into())
        .spawn(move || -> std::io::Result<()> {
            unshare(CloneFlags::CLONE_NEWNET).map_err(nix_io)?;
            nix::mount::mount(
                Some(THREAD_SELF_NS),
                &target,
                None::<&str>,
                nix::mount::MsFlags::MS_BIND,
                None::<&str>,
            )
            .map_err(nix_io)
        })
        .map_err(|e| err("create", e))?
        .join()
        .unwrap_or_else(|_| Err(std::io::Error::other("netns creation thread panicked")));
    if let Err(e) = made {
        let _ = std::fs::remove_file(&path);
        return Err(err("create", e));
    }
    Netns::open(&path)
}

/// Deletes the named namespace: unmounts `/var/run/netns/NAME` and removes the file, like
/// `ip netns delete NAME`. The namespace itself goes away when its last user (process, open
/// descriptor, netlink socket) is gone. Deleting a name that does not exist is not an error.
pub fn delete_named(name: &str) -> Result<()> {
    let path = named_path(name)?;
    match nix::mount::umount2(&path, nix::mount::MntFlags::MNT_DETACH) {
        Ok(()) | Err(nix::Error::EINVAL) | Err(nix::Error::ENOENT) => {}
        Err(e) => {
            return Err(NetError::Netns {
                op: "delete",
                path,
                source: nix_io(e),
            })
        }
    }
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(NetError::Netns {
            op: "delete",
            path,
            source,
        }),
    }
}

/// Lists the names under `/var/run/netns`.
pub fn list_named() -> Result<Vec<String>> {
    let mut out = Vec::new();
    let rd = match std::fs::read_dir(NETNS_RUN_DIR) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(source) => {
            return Err(NetError::Netns {
                op: "list",
                path: NETNS_RUN_DIR.into(),
                source,
            })
        }
    };
    for entry in rd.flatten() {
        out.push(entry.file_name().to_string_lossy().into_owned());
    }
    out.sort();
    Ok(out)
}
