//! Network namespaces by path (`/run/netns/<name>`, as `ip netns` makes them).
//!
//! A socket belongs to the namespace it was created in, whatever thread uses it later, so a
//! process in the host namespace can serve inside another one: create the socket on a
//! thread that joined it ([`run_in`]), then hand it to the async runtime.

use std::io;
use std::os::fd::AsRawFd as _;
use std::path::Path;

/// Runs `f` on a fresh thread that joined the network namespace at `ns`; the calling
/// thread's namespace is untouched (namespaces are per thread).
pub fn run_in<T: Send>(ns: &Path, f: impl FnOnce() -> io::Result<T> + Send) -> io::Result<T> {
    let file = std::fs::File::open(ns)?;
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                // SAFETY: setns on an fd we own; it only changes this (scoped) thread.
                if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(io::Error::other(format!(
                        "join network namespace {}: {}",
                        ns.display(),
                        io::Error::last_os_error()
                    )));
                }
                f()
            })
            .join()
            .map_err(|_| io::Error::other("thread in network namespace panicked"))?
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_namespace_is_an_error_naming_it() {
        let err = run_in(Path::new("/run/netns/capsa-no-such-ns"), || Ok(())).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
    }

    #[test]
    fn sockets_made_in_our_own_namespace_work() {
        let listener = run_in(Path::new("/proc/self/ns/net"), || {
            std::net::TcpListener::bind("127.0.0.1:0")
        })
        .unwrap();
        assert!(listener.local_addr().unwrap().port() > 0);
    }
}
