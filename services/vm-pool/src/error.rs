//! vm-pool's errors and the gRPC code of each.

use capsa_grpc::{ErrorCode, ServiceError};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad request field; the message names it.
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    /// The name is taken by something else (a snapshot id holding another VM's snapshot).
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    /// The node is at capacity.
    #[error("{0}")]
    ResourceExhausted(String),
    /// The pool is shutting down, or a VM went away during its boot; another node or a
    /// retry may succeed.
    #[error("{0}")]
    Unavailable(String),
    /// A VM's boot failed (its VMM exited, or its agent stayed silent past the boot timeout).
    #[error("{0}")]
    BootFailed(String),
    /// Start-up configuration that cannot work (bad image dir, no engine).
    #[error("configuration: {0}")]
    Config(String),
    /// A file of the state dir (a snapshot's) could not be read or written.
    #[error("{what} {}", path.display())]
    Io {
        what: &'static str,
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// An `ip` or `nft` command (or a sysctl write) failed.
    #[error("{command}: {stderr}")]
    Command { command: String, stderr: String },
    #[error("vmm")]
    Vmm(#[from] capsa_vmm::VmmError),
    #[error("node registry")]
    Store(#[from] capsa_store::StoreError),
    #[error("grpc server")]
    Serve(#[from] capsa_grpc::ServeError),
}

impl Error {
    pub(crate) fn io(what: &'static str, path: &std::path::Path, source: std::io::Error) -> Error {
        Error::Io {
            what,
            path: path.to_owned(),
            source,
        }
    }
}

impl ServiceError for Error {
    fn code(&self) -> ErrorCode {
        match self {
            Error::InvalidArgument(_) => ErrorCode::InvalidArgument,
            Error::NotFound(_) => ErrorCode::NotFound,
            Error::AlreadyExists(_) => ErrorCode::AlreadyExists,
            Error::FailedPrecondition(_) => ErrorCode::FailedPrecondition,
            Error::ResourceExhausted(_) => ErrorCode::ResourceExhausted,
            Error::Unavailable(_) | Error::BootFailed(_) => ErrorCode::Unavailable,
            Error::Config(_)
            | Error::Io { .. }
            | Error::Command { .. }
            | Error::Vmm(_)
            | Error::Store(_)
            | Error::Serve(_) => ErrorCode::Internal,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_pinned() {
        let cases = [
            (
                Error::InvalidArgument("lease_id is empty".into()),
                tonic::Code::InvalidArgument,
            ),
            (Error::NotFound("vm".into()), tonic::Code::NotFound),
            (Error::AlreadyExists("x".into()), tonic::Code::AlreadyExists),
            (
                Error::FailedPrecondition("x".into()),
                tonic::Code::FailedPrecondition,
            ),
            (
                Error::ResourceExhausted("x".into()),
                tonic::Code::ResourceExhausted,
            ),
            (Error::Unavailable("x".into()), tonic::Code::Unavailable),
            (Error::BootFailed("x".into()), tonic::Code::Unavailable),
            (Error::Config("x".into()), tonic::Code::Internal),
            (
                Error::io(
                    "read",
                    std::path::Path::new("/x"),
                    std::io::Error::other("x"),
                ),
                tonic::Code::Internal,
            ),
            (
                Error::Command {
                    command: "nft -j -f -".into(),
                    stderr: "x".into(),
                },
                tonic::Code::Internal,
            ),
        ];
        for (err, code) in cases {
            let status = capsa_grpc::to_status(&err);
            assert_eq!(status.code(), code, "{err}");
        }
        let s = capsa_grpc::to_status(&Error::InvalidArgument("lease_id is empty".into()));
        assert_eq!(s.message(), "lease_id is empty");
    }
}
