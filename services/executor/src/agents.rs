//! One gRPC channel per VM, cached. A channel connects lazily over the VM's hybrid vsock
//! socket and reconnects by itself (every connect redoes the `CONNECT 1024` handshake), so
//! the cache only has to forget VMs that are gone: on access when the socket has
//! disappeared, after a transport error, and in a periodic sweep for VMs nobody asks about.
//!
//! Each VM also carries one gate per kernel (Python, shell). The agent runs executes on a
//! kernel one at a time in arrival order; holding the gate while an execute is forwarded
//! keeps that order and lets the executor's stream limits start when the kernel is really
//! ours, not while the call waits in the guest's queue.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use capsa_proto::agent::v1::agent_service_client::AgentServiceClient;
use capsa_proto::common::v1::Language;
use capsa_proto::limits::MAX_MESSAGE_BYTES;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::error::Error;

type Propagate = fn(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status>;

/// The agent client: every call carries the current trace context.
pub type AgentClient = AgentServiceClient<InterceptedService<Channel, Propagate>>;

/// The link to one VM's agent.
pub struct VmLink {
    pub vm_id: String,
    channel: Channel,
    python_gate: Arc<tokio::sync::Mutex<()>>,
    shell_gate: Arc<tokio::sync::Mutex<()>>,
}

impl VmLink {
    /// The agent's events and chunks reach the executor's clients unchanged, so both sides
    /// of the executor use the contract's message limit.
    pub fn client(&self) -> AgentClient {
        AgentServiceClient::with_interceptor(
            self.channel.clone(),
            capsa_telemetry::propagate as Propagate,
        )
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }

    /// The gate of the kernel `language` runs in (UNSPECIFIED is Python, like the agent).
    pub fn gate(&self, language: Language) -> Arc<tokio::sync::Mutex<()>> {
        match language {
            Language::Shell => self.shell_gate.clone(),
            Language::Python | Language::Unspecified => self.python_gate.clone(),
        }
    }
}

/// The VMs of this host the executor has talked to.
pub struct Agents {
    state_dir: PathBuf,
    links: Mutex<HashMap<String, Arc<VmLink>>>,
}

impl Agents {
    pub fn new(state_dir: PathBuf) -> Agents {
        Agents {
            state_dir,
            links: Mutex::new(HashMap::new()),
        }
    }

    /// The link to `vm_id`: INVALID_ARGUMENT for a malformed id, NOT_FOUND when the VM's
    /// socket is not on this host.
    pub fn get(&self, vm_id: &str) -> Result<Arc<VmLink>, Error> {
        let socket = capsa_vsock::vm_socket_path(&self.state_dir, vm_id).ok_or_else(|| {
            Error::invalid("vm_id", "must be 1 to 64 ASCII letters, digits or '-'")
        })?;
        if !socket_exists(&socket) {
            self.links.lock().unwrap().remove(vm_id);
            return Err(Error::VmNotFound {
                vm_id: vm_id.to_owned(),
            });
        }
        let mut links = self.links.lock().unwrap();
        let link = links.entry(vm_id.to_owned()).or_insert_with(|| {
            tracing::debug!(vm_id, socket = %socket.display(), "new agent channel");
            Arc::new(VmLink {
                vm_id: vm_id.to_owned(),
                channel: capsa_vsock::channel(socket, capsa_vsock::AGENT_PORT),
                python_gate: Arc::default(),
                shell_gate: Arc::default(),
            })
        });
        Ok(link.clone())
    }

    /// After a failed call: forget the VM if its socket is gone (it was destroyed).
    pub fn recheck(&self, vm_id: &str) {
        if let Some(socket) = capsa_vsock::vm_socket_path(&self.state_dir, vm_id)
            && !socket_exists(&socket)
        {
            self.links.lock().unwrap().remove(vm_id);
        }
    }

    /// Forgets every VM whose socket has disappeared; returns how many are left.
    pub fn sweep(&self) -> usize {
        let mut links = self.links.lock().unwrap();
        links.retain(|vm_id, _| {
            capsa_vsock::vm_socket_path(&self.state_dir, vm_id)
                .is_some_and(|socket| socket_exists(&socket))
        });
        links.len()
    }

    pub fn len(&self) -> usize {
        self.links.lock().unwrap().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn socket_exists(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn make_socket(state: &Path, vm_id: &str) -> PathBuf {
        let path = capsa_vsock::vm_socket_path(state, vm_id).unwrap();
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, b"").unwrap();
        path
    }

    #[tokio::test]
    async fn links_are_cached_and_forgotten_when_the_socket_goes() {
        let dir = tempfile::tempdir().unwrap();
        let agents = Agents::new(dir.path().to_owned());
        let socket = make_socket(dir.path(), "vm-a");
        make_socket(dir.path(), "vm-b");
        let a1 = agents.get("vm-a").unwrap();
        let a2 = agents.get("vm-a").unwrap();
        assert!(Arc::ptr_eq(&a1, &a2));
        agents.get("vm-b").unwrap();
        assert_eq!(agents.len(), 2);

        std::fs::remove_file(&socket).unwrap();
        assert_eq!(agents.sweep(), 1);
        assert!(matches!(agents.get("vm-a"), Err(Error::VmNotFound { .. })));
    }

    #[tokio::test]
    async fn bad_ids_and_unknown_vms() {
        let dir = tempfile::tempdir().unwrap();
        let agents = Agents::new(dir.path().to_owned());
        assert!(matches!(
            agents.get("../etc"),
            Err(Error::InvalidArgument { field: "vm_id", .. })
        ));
        assert!(matches!(
            agents.get("vm-nope"),
            Err(Error::VmNotFound { .. })
        ));
        assert!(agents.is_empty());
    }

    #[tokio::test]
    async fn unspecified_language_shares_the_python_gate() {
        let dir = tempfile::tempdir().unwrap();
        make_socket(dir.path(), "vm-a");
        let link = Agents::new(dir.path().to_owned()).get("vm-a").unwrap();
        assert!(Arc::ptr_eq(
            &link.gate(Language::Unspecified),
            &link.gate(Language::Python)
        ));
        assert!(!Arc::ptr_eq(
            &link.gate(Language::Shell),
            &link.gate(Language::Python)
        ));
    }
}
