//! The Rust twin of the README's session flow. Run it against a stack started by
//! `deploy/scripts/up.sh` (which writes `.capsa/dev.env`) from the repository root:
//!
//! ```sh
//! cargo run -p capsa-client --example quickstart
//! ```
//!
//! The e2e test `tests/tests/rust_client.rs` runs [`quickstart`] against a real stack.

use std::time::Duration;

use capsa_client::{Client, Event, ExecuteOptions, SessionOptions, UploadOptions};
use futures::StreamExt as _;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let client = Client::from_env().await?;
    quickstart(&client).await?;
    Ok(())
}

/// Creates a session, keeps state across executes, streams output, moves a file both
/// ways, reads info and usage, extends and closes it.
pub async fn quickstart(client: &Client) -> Result<(), Box<dyn std::error::Error>> {
    let options = SessionOptions::default().lifetime(Duration::from_secs(600));
    let session = client.create_session(options).await?;
    println!("session {}", session.id());

    session.run("x = 42").await?;
    let out = session.run("print(x)").await?;
    assert_eq!(out.stdout, "42\n");
    println!(
        "print(x) -> {:?} (exit {}, wall {:?}, cpu {:?})",
        out.stdout, out.exit_code, out.wall_time, out.cpu_time
    );

    let mut events = session
        .execute("for i in range(3): print(i, flush=True)")
        .await?;
    let mut streamed = String::new();
    while let Some(event) = events.next().await {
        if let Event::Stdout(chunk) = event? {
            streamed += &String::from_utf8_lossy(&chunk);
        }
    }
    assert_eq!(streamed, "0\n1\n2\n");

    let shell = session
        .run_with("echo hello from $0", ExecuteOptions::shell())
        .await?;
    print!("{}", shell.stdout);

    let data = b"name,value\na,1\nb,2\n";
    session
        .upload_from(&data[..], "/root/data.csv", UploadOptions::default())
        .await?;
    let mut back = Vec::new();
    session.download_to("/root/data.csv", &mut back).await?;
    assert_eq!(back, data);

    let info = session.info().await?;
    println!("status {:?}, node {}", info.status(), info.node_id);
    let usage = session.usage().await?;
    println!("memory used {} bytes", usage.memory_used_bytes);
    assert!(session.is_active().await?);
    session.extend(Duration::from_secs(60)).await?;

    let ended = session.close().await?;
    println!("ended: {:?}", ended.end_reason());
    Ok(())
}
