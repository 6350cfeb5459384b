//! Moving files through the API: uploads read any `AsyncRead` and downloads write to any
//! `AsyncWrite`, chunk by chunk (at most [`MAX_CHUNK_BYTES`] a message), never holding a
//! whole file. Both check the sha256 of what went through against what the server saw.

use std::path::Path;

use bytes::BytesMut;
use capsa_proto::common::v1::{FileInfo, UploadHeader};
use capsa_proto::limits::MAX_CHUNK_BYTES;
use capsa_proto::session::v1::{
    DownloadFileResponse, UploadFileHeader, UploadFileRequest, download_file_response,
    upload_file_request,
};
use sha2::Digest as _;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::RawClient;
use crate::error::{Error, Result};

/// How an upload writes its file.
#[derive(Debug, Clone, Default)]
pub struct UploadOptions {
    /// Permission bits, e.g. `0o755` [default: 0o644].
    pub mode: Option<u32>,
    /// Fail with [`Error::AlreadyExists`] instead of replacing an existing file.
    pub no_overwrite: bool,
    /// The number of bytes the reader will give, when known. Set it whenever possible: an
    /// upload that ends with another count is rejected and nothing is written.
    /// [`Session::upload_file`](crate::Session::upload_file) sets it from the file.
    pub size: Option<u64>,
}

impl UploadOptions {
    pub fn mode(mut self, mode: u32) -> Self {
        self.mode = Some(mode);
        self
    }
}

/// A finished upload: the file as written, and the sha256 (hex) of its bytes, equal on
/// both ends.
#[derive(Debug, Clone, PartialEq)]
pub struct Uploaded {
    pub info: FileInfo,
    pub sha256: String,
}

/// A finished download: the file's info, the bytes written and their sha256 (hex).
#[derive(Debug, Clone, PartialEq)]
pub struct Downloaded {
    pub info: FileInfo,
    pub bytes: u64,
    pub sha256: String,
}

pub(crate) async fn upload<R: AsyncRead + Unpin>(
    mut raw: RawClient,
    session_id: String,
    reader: R,
    remote_path: &str,
    options: UploadOptions,
) -> Result<Uploaded> {
    let (tx, rx) = mpsc::channel(2);
    let header = UploadFileRequest {
        part: Some(upload_file_request::Part::Header(UploadFileHeader {
            session_id,
            file: Some(UploadHeader {
                path: remote_path.to_owned(),
                mode: options.mode.unwrap_or(0),
                no_overwrite: options.no_overwrite,
                size: options.size,
            }),
        })),
    };
    tx.send(header)
        .await
        .map_err(|_| Error::Protocol("the upload channel closed".into()))?;
    // The reader is pumped in this task (so it needs not be 'static) while the call sends
    // what it produced.
    let rpc = raw.upload_file(ReceiverStream::new(rx));
    let pump = pump(reader, tx);
    tokio::pin!(rpc, pump);
    let (response, pumped) = tokio::select! {
        biased;
        pumped = &mut pump => (rpc.await, Some(pumped)),
        // The call ended before the reader did: its status says why.
        response = &mut rpc => (response, None),
    };
    // A local read error explains the server's refusal better than the refusal does.
    let local = match pumped {
        Some(Err(e)) => return Err(e),
        Some(Ok(local)) => local,
        None => None,
    };
    let result = response?.into_inner().result.unwrap_or_default();
    let Some(local_sha) = local else {
        return Err(Error::Protocol(
            "the upload was answered before it was sent whole".into(),
        ));
    };
    if result.sha256 != local_sha {
        return Err(Error::Protocol(format!(
            "the sandbox received different bytes (sha256 {} != local {local_sha})",
            result.sha256
        )));
    }
    Ok(Uploaded {
        info: result.info.unwrap_or_default(),
        sha256: result.sha256,
    })
}

/// Reads `reader` into full chunks and sends them; returns the sha256 of what was sent, or
/// `None` when the call went away first.
async fn pump<R: AsyncRead + Unpin>(
    mut reader: R,
    tx: mpsc::Sender<UploadFileRequest>,
) -> Result<Option<String>> {
    let mut hasher = sha2::Sha256::new();
    loop {
        let mut buf = BytesMut::with_capacity(MAX_CHUNK_BYTES);
        while buf.len() < MAX_CHUNK_BYTES {
            match reader.read_buf(&mut buf).await {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) => {
                    // The server rejects a message with neither header nor data, so a
                    // file cut short by a read error is never written as if whole.
                    let _ = tx.send(UploadFileRequest { part: None }).await;
                    return Err(Error::io("reading the upload", e));
                }
            }
        }
        if buf.is_empty() {
            return Ok(Some(hex::encode(hasher.finalize())));
        }
        hasher.update(&buf);
        let data = upload_file_request::Part::Data(buf.freeze());
        if tx
            .send(UploadFileRequest { part: Some(data) })
            .await
            .is_err()
        {
            return Ok(None);
        }
    }
}

/// A download whose info has arrived and whose data is still to be read.
pub struct Download {
    info: FileInfo,
    stream: tonic::Streaming<DownloadFileResponse>,
    progress: Option<Box<dyn FnMut(u64) + Send>>,
}

impl std::fmt::Debug for Download {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Download")
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

impl Download {
    pub(crate) async fn start(mut raw: RawClient, session_id: String, path: &str) -> Result<Self> {
        let request = capsa_proto::session::v1::DownloadFileRequest {
            session_id,
            path: path.to_owned(),
        };
        let mut stream = raw.download_file(request).await?.into_inner();
        match stream.message().await?.and_then(|m| m.part) {
            Some(download_file_response::Part::Info(info)) => Ok(Download {
                info,
                stream,
                progress: None,
            }),
            _ => Err(Error::Protocol(
                "the download did not start with the file's info".into(),
            )),
        }
    }

    /// The file being downloaded (its `size` is what [`Download::write_to`] will write).
    pub fn info(&self) -> &FileInfo {
        &self.info
    }

    /// Calls `progress` with the byte count of every chunk as it is written (e.g. to
    /// advance a progress bar).
    pub fn on_progress(mut self, progress: impl FnMut(u64) + Send + 'static) -> Self {
        self.progress = Some(Box::new(progress));
        self
    }

    /// Writes the data to `writer` as it arrives, flushes it, and checks that it was the
    /// whole file.
    pub async fn write_to<W: AsyncWrite + Unpin>(mut self, mut writer: W) -> Result<Downloaded> {
        let mut hasher = sha2::Sha256::new();
        let mut bytes = 0u64;
        while let Some(message) = self.stream.message().await? {
            let Some(download_file_response::Part::Data(data)) = message.part else {
                return Err(Error::Protocol("unexpected message in the download".into()));
            };
            hasher.update(&data);
            bytes += data.len() as u64;
            writer
                .write_all(&data)
                .await
                .map_err(|e| Error::io("writing the download", e))?;
            if let Some(progress) = &mut self.progress {
                progress(data.len() as u64);
            }
        }
        writer
            .flush()
            .await
            .map_err(|e| Error::io("writing the download", e))?;
        if bytes != self.info.size {
            return Err(Error::Protocol(format!(
                "the download ended after {bytes} of {} bytes",
                self.info.size
            )));
        }
        Ok(Downloaded {
            info: self.info,
            bytes,
            sha256: hex::encode(hasher.finalize()),
        })
    }

    /// Writes the file to `local` through a temporary file beside it, renamed into place
    /// once complete: `local` is never left half written.
    pub async fn save_as(self, local: &Path) -> Result<Downloaded> {
        let dir = local
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let name = local
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let path = dir.join(format!(".{name}.capsa-part-{}", std::process::id()));
        let file = tokio::fs::File::create(&path)
            .await
            .map_err(|e| Error::io(format!("cannot write {}", path.display()), e))?;
        let part = PartFile(Some(path.clone()));
        let done = self.write_to(file).await?;
        tokio::fs::rename(&path, local)
            .await
            .map_err(|e| Error::io(format!("cannot write {}", local.display()), e))?;
        part.keep();
        Ok(done)
    }
}

/// Removes a partial download unless it was completed.
struct PartFile(Option<std::path::PathBuf>);

impl PartFile {
    fn keep(mut self) {
        self.0 = None;
    }
}

impl Drop for PartFile {
    fn drop(&mut self) {
        if let Some(path) = &self.0 {
            let _ = std::fs::remove_file(path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Gives `ok` bytes, then fails.
    struct Failing {
        ok: usize,
    }

    impl AsyncRead for Failing {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            _cx: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            if self.ok == 0 {
                return std::task::Poll::Ready(Err(std::io::Error::other("disk on fire")));
            }
            let n = self.ok.min(buf.remaining()).min(1000);
            buf.put_slice(&vec![1u8; n]);
            self.ok -= n;
            std::task::Poll::Ready(Ok(()))
        }
    }

    async fn sent(rx: &mut mpsc::Receiver<UploadFileRequest>) -> Vec<Option<usize>> {
        let mut parts = Vec::new();
        while let Some(m) = rx.recv().await {
            parts.push(match m.part {
                Some(upload_file_request::Part::Data(d)) => Some(d.len()),
                Some(upload_file_request::Part::Header(_)) => panic!("a second header"),
                None => None,
            });
        }
        parts
    }

    #[tokio::test]
    async fn readers_go_out_in_full_chunks_with_their_sha256() {
        let data: Vec<u8> = (0..MAX_CHUNK_BYTES * 5 / 2).map(|i| i as u8).collect();
        let (tx, mut rx) = mpsc::channel(8);
        let (sha, parts) = tokio::join!(pump(&data[..], tx), sent(&mut rx));
        assert_eq!(
            parts,
            [
                Some(MAX_CHUNK_BYTES),
                Some(MAX_CHUNK_BYTES),
                Some(MAX_CHUNK_BYTES / 2)
            ]
        );
        assert_eq!(
            sha.unwrap().unwrap(),
            hex::encode(sha2::Sha256::digest(&data))
        );
    }

    #[tokio::test]
    async fn a_read_error_ends_the_upload_with_a_message_the_server_rejects() {
        let (tx, mut rx) = mpsc::channel(8);
        let (result, parts) = tokio::join!(
            pump(
                Failing {
                    ok: MAX_CHUNK_BYTES + 5000,
                },
                tx,
            ),
            sent(&mut rx)
        );
        assert!(
            matches!(result, Err(Error::Io { ref source, .. }) if source.to_string() == "disk on fire"),
            "{result:?}"
        );
        // The full chunk went out; the one cut short by the error is replaced by the empty
        // message (neither header nor data).
        assert_eq!(parts, [Some(MAX_CHUNK_BYTES), None]);
    }

    #[tokio::test]
    async fn a_call_gone_away_stops_the_reader() {
        let (tx, rx) = mpsc::channel(1);
        drop(rx);
        let data = vec![0u8; 3 * MAX_CHUNK_BYTES];
        assert!(matches!(pump(&data[..], tx).await, Ok(None)));
    }
}
