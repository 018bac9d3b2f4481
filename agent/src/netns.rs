//! Work done inside another process's network namespace. Sockets (a TCP
//! iterator's, a netlink socket) belong to the namespace of the thread that
//! makes them, so a node in its own namespace (a container, a pod) is read
//! from a short-lived thread that joined it; the agent's own threads never
//! change namespace.

use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;

/// Whether `pid` is in the agent's own network namespace (unknown counts as
/// no: the caller then joins the process's namespace, which is right either way).
pub fn is_ours(pid: u32) -> bool {
    let ino = |path: &str| std::fs::metadata(path).map(|m| (m.dev(), m.ino())).ok();
    match (ino("/proc/self/ns/net"), ino(&format!("/proc/{pid}/ns/net"))) {
        (Some(a), Some(b)) => a == b,
        _ => false,
    }
}

/// Runs `f` on a thread that joined the network namespace of `pid`, and
/// returns what it returned. The thread ends right after.
pub fn run_in<T: Send>(pid: u32, f: impl FnOnce() -> T + Send) -> std::io::Result<T> {
    std::thread::scope(|s| {
        s.spawn(move || {
            let path = format!("/proc/{pid}/ns/net");
            let ns = std::fs::File::open(&path)
                .map_err(|e| std::io::Error::new(e.kind(), format!("opening {path}: {e}")))?;
            // SAFETY: setns on a namespace fd we hold open; it changes only
            // this thread, which ends when `f` returns.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                let e = std::io::Error::last_os_error();
                return Err(std::io::Error::new(e.kind(), format!("joining the network namespace of pid {pid}: {e}")));
            }
            Ok(f())
        })
        .join()
        .map_err(|_| std::io::Error::other("network namespace thread panicked"))?
    })
}
