//! What every Capsa gRPC server shares: the closed set of error codes and their one
//! conversion to `tonic::Status` ([`error`]), and server assembly with health, reflection,
//! trace-context extraction and graceful shutdown ([`server`]), the flags every service
//! shares ([`args`]), TLS of the internal plane and the public endpoint ([`tls`]), and the process glue and exit-code policy of every service `main`
//! ([`process`]).

pub mod args;
pub mod error;
pub mod process;
pub mod server;
pub mod tls;

pub use error::{ErrorCode, ServiceError, VM_GONE_METADATA, to_status};
pub use server::{ServeError, Server, serve_tcp};
