//! `capsa port-forward`: local TCP listeners whose every accepted connection is tunnelled,
//! through its own ConnectPort call, to a port on 127.0.0.1 inside the session's VM.
//!
//! Each connection is independent: a guest port nothing listens on (FAILED_PRECONDITION)
//! closes that local connection and is reported on stderr with the server's message, and
//! the listeners keep accepting. Only answers that no later connection could get past (the
//! session is gone, the key is refused) end the command.

use std::net::SocketAddr;

use capsa_client::{Client, Error};
use serde_json::json;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use crate::args::PortForwardArgs;
use crate::commands::{note, say};
use crate::error::CliError;

pub async fn port_forward(client: &Client, a: PortForwardArgs, json: bool) -> Result<u8, CliError> {
    // A wrong id fails here, before anything listens.
    client.session_info(&a.session).await?;
    let mut listeners = Vec::new();
    for mapping in &a.ports {
        let wanted = SocketAddr::new(a.address, mapping.local);
        let listener = TcpListener::bind(wanted)
            .await
            .map_err(|e| CliError::Local(format!("cannot listen on {wanted}: {e}")))?;
        let local = listener
            .local_addr()
            .map_err(|e| CliError::Local(format!("cannot listen on {wanted}: {e}")))?;
        if json {
            say(json!({"local_address": local.to_string(), "remote_port": mapping.remote}))?;
        } else {
            say(format!("Forwarding from {local} -> {}", mapping.remote))?;
        }
        listeners.push((listener, mapping.remote));
    }
    let (fatal_tx, mut fatal_rx) = mpsc::channel(1);
    for (listener, remote) in listeners {
        tokio::spawn(serve(
            listener,
            client.clone(),
            a.session.clone(),
            remote,
            fatal_tx.clone(),
        ));
    }
    drop(fatal_tx);
    match fatal_rx.recv().await {
        Some(e) => Err(e),
        None => Err(CliError::Local("every listener stopped".into())),
    }
}

/// Accepts connections on `listener` for as long as the command runs.
async fn serve(
    listener: TcpListener,
    client: Client,
    session: String,
    remote: u16,
    fatal: mpsc::Sender<CliError>,
) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                tokio::spawn(forward(
                    client.clone(),
                    session.clone(),
                    stream,
                    peer,
                    remote,
                    fatal.clone(),
                ));
            }
            // Out of descriptors, or a connection reset before it was accepted: the next
            // accept may well succeed.
            Err(e) => {
                note(format!("capsa: port-forward: accepting a connection: {e}"));
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

/// One local connection: its tunnel, copied both ways until both sides are done.
async fn forward(
    client: Client,
    session: String,
    stream: TcpStream,
    peer: SocketAddr,
    remote: u16,
    fatal: mpsc::Sender<CliError>,
) {
    // Small writes (keystrokes, request lines) go out at once.
    let _ = stream.set_nodelay(true);
    let result = match client.session(&session).connect_port(remote).await {
        Ok(connection) => connection.pipe(stream).await.map(|_| ()),
        // Dropping `stream` closes the local connection.
        Err(e) => Err(e),
    };
    let Err(e) = result else { return };
    note(format!("capsa: port-forward {peer} -> {remote}: {e}"));
    if matches!(
        e,
        Error::NotFound(_) | Error::Unauthenticated(_) | Error::PermissionDenied(_)
    ) {
        let _ = fatal.send(e.into()).await;
    }
}
