//! Errors of the VMM layer. Messages describe this layer only; causes are `#[source]`.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("invalid vm spec: {0}")]
    InvalidSpec(String),
    #[error("cannot start {program}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} ({})", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The VMM (or a tool it needs, e.g. qemu-img) exited while the VM was being started.
    #[error("{process} exited during start-up: {detail}")]
    StartupExit {
        process: &'static str,
        detail: String,
    },
    #[error("{0} timed out")]
    Timeout(String),
    #[error("qmp {command}: {message}")]
    Qmp { command: String, message: String },
    #[error("cloud hypervisor api {endpoint}: {message}")]
    Api { endpoint: String, message: String },
    /// The VMM binary is a release Capsa cannot drive (see `ch_model::MIN_VMM_VERSION`).
    #[error("cloud-hypervisor {found} is not supported: capsa needs {required} or later ({why})")]
    UnsupportedVmm {
        found: String,
        required: String,
        why: String,
    },
    /// The VM's VMM is gone; the operation needs it running.
    #[error("vm has exited: {0}")]
    Exited(String),
    #[error("no usable engine: {0}")]
    NoEngine(String),
}

impl VmmError {
    pub(crate) fn io(what: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        VmmError::Io {
            what,
            path: path.into(),
            source,
        }
    }
}
