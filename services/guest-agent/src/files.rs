//! Files in the guest: upload (to a temp file beside the target, renamed into place when
//! complete, so a reader never sees half a file), download in bounded chunks, listing,
//! info, mkdir and remove. Nothing here holds a whole file in memory.

use std::os::unix::fs::{DirBuilderExt as _, MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use capsa_proto::limits::{MAX_CHUNK_BYTES, MAX_PATH_BYTES};
use sha2::{Digest as _, Sha256};
use tokio::io::AsyncWriteExt as _;

use crate::error::Error;

/// Most entries ListFiles returns (the response must fit one gRPC message).
pub const MAX_LIST: usize = 10_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    Regular,
    Directory,
    Symlink,
    Other,
}

#[derive(Debug, Clone, PartialEq)]
pub struct FileInfo {
    pub path: String,
    pub name: String,
    pub kind: FileKind,
    pub size: u64,
    pub mode: u32,
    pub modified: Option<SystemTime>,
}

/// Checks a client-supplied path: absolute, at most [`MAX_PATH_BYTES`] bytes, no NUL.
pub fn check_path(field: &'static str, path: &str) -> Result<PathBuf, Error> {
    if path.is_empty() {
        return Err(Error::invalid(field, "is empty"));
    }
    if path.len() > MAX_PATH_BYTES {
        return Err(Error::invalid(
            field,
            format!("is longer than {MAX_PATH_BYTES} bytes"),
        ));
    }
    if path.contains('\0') {
        return Err(Error::invalid(field, "contains a NUL byte"));
    }
    if !path.starts_with('/') {
        return Err(Error::invalid(field, format!("{path:?} is not absolute")));
    }
    Ok(PathBuf::from(path))
}

fn check_mode(mode: u32, default: u32) -> Result<u32, Error> {
    match mode {
        0 => Ok(default),
        m if m <= 0o7777 => Ok(m),
        m => Err(Error::invalid(
            "mode",
            format!("{m:#o} has bits beyond 0o7777"),
        )),
    }
}

fn info_from(path: &Path, meta: &std::fs::Metadata) -> FileInfo {
    let ft = meta.file_type();
    let kind = if ft.is_symlink() {
        FileKind::Symlink
    } else if ft.is_dir() {
        FileKind::Directory
    } else if ft.is_file() {
        FileKind::Regular
    } else {
        FileKind::Other
    };
    FileInfo {
        path: path.to_string_lossy().into_owned(),
        name: path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "/".into()),
        kind,
        size: meta.size(),
        mode: meta.mode() & 0o7777,
        modified: meta.modified().ok(),
    }
}

pub async fn info(path: &str) -> Result<FileInfo, Error> {
    let p = check_path("path", path)?;
    let meta = tokio::fs::symlink_metadata(&p)
        .await
        .map_err(|e| Error::fs("stat", path, e))?;
    Ok(info_from(&p, &meta))
}

#[tracing::instrument]
pub async fn list(path: &str) -> Result<Vec<FileInfo>, Error> {
    let dir = check_path("path", path)?;
    let meta = tokio::fs::metadata(&dir)
        .await
        .map_err(|e| Error::fs("stat", path, e))?;
    if !meta.is_dir() {
        return Err(Error::FailedPrecondition {
            path: path.into(),
            reason: "not a directory".into(),
        });
    }
    let mut entries = tokio::fs::read_dir(&dir)
        .await
        .map_err(|e| Error::fs("list", path, e))?;
    let mut out = Vec::new();
    while let Some(entry) = entries
        .next_entry()
        .await
        .map_err(|e| Error::fs("list", path, e))?
    {
        if out.len() == MAX_LIST {
            return Err(Error::FailedPrecondition {
                path: path.into(),
                reason: format!("has more than {MAX_LIST} entries"),
            });
        }
        let p = entry.path();
        // An entry removed while listing is simply left out.
        if let Ok(meta) = tokio::fs::symlink_metadata(&p).await {
            out.push(info_from(&p, &meta));
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

#[tracing::instrument]
pub async fn make_dir(path: &str, mode: u32) -> Result<FileInfo, Error> {
    let p = check_path("path", path)?;
    let mode = check_mode(mode, 0o755)?;
    match tokio::fs::symlink_metadata(&p).await {
        Ok(meta) if meta.is_dir() => return Ok(info_from(&p, &meta)),
        Ok(_) => return Err(Error::AlreadyExists { path: path.into() }),
        Err(_) => {}
    }
    let (dir, p2) = (p.clone(), path.to_string());
    tokio::task::spawn_blocking(move || {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(mode)
            .create(&dir)?;
        // The umask narrowed `mode`; the directory asked for gets exactly it.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(mode))
    })
    .await
    .expect("mkdir task does not panic")
    .map_err(|e| Error::fs("mkdir", &p2, e))?;
    info(path).await
}

#[tracing::instrument]
pub async fn remove(path: &str, recursive: bool) -> Result<(), Error> {
    let p = check_path("path", path)?;
    if p == Path::new("/") {
        return Err(Error::FailedPrecondition {
            path: path.into(),
            reason: "refusing to remove /".into(),
        });
    }
    let meta = tokio::fs::symlink_metadata(&p)
        .await
        .map_err(|e| Error::fs("stat", path, e))?;
    let result = if !meta.is_dir() {
        tokio::fs::remove_file(&p).await
    } else if recursive {
        tokio::fs::remove_dir_all(&p).await
    } else {
        tokio::fs::remove_dir(&p).await
    };
    result.map_err(|e| match e.kind() {
        std::io::ErrorKind::DirectoryNotEmpty => Error::FailedPrecondition {
            path: path.into(),
            reason: "directory is not empty (set recursive to remove it)".into(),
        },
        _ => Error::fs("remove", path, e),
    })
}

/// Opens a regular file for download.
pub async fn open_download(path: &str) -> Result<(FileInfo, tokio::fs::File), Error> {
    let p = check_path("path", path)?;
    let file = tokio::fs::File::open(&p)
        .await
        .map_err(|e| Error::fs("open", path, e))?;
    let meta = file
        .metadata()
        .await
        .map_err(|e| Error::fs("stat", path, e))?;
    if !meta.is_file() {
        return Err(Error::FailedPrecondition {
            path: path.into(),
            reason: "not a regular file".into(),
        });
    }
    Ok((info_from(&p, &meta), file))
}

/// An upload in progress: a temp file in the target's directory that is removed unless
/// [`Upload::finish`] renames it into place.
pub struct Upload {
    path: String,
    dest: PathBuf,
    mode: u32,
    no_overwrite: bool,
    file: tokio::fs::File,
    temp: tempfile::TempPath,
    hasher: Sha256,
}

impl Upload {
    pub async fn begin(path: &str, mode: u32, no_overwrite: bool) -> Result<Upload, Error> {
        let dest = check_path("path", path)?;
        let mode = check_mode(mode, 0o644)?;
        let parent = dest
            .parent()
            .ok_or_else(|| Error::invalid("path", "is the root directory"))?
            .to_owned();
        match tokio::fs::symlink_metadata(&dest).await {
            Ok(meta) if meta.is_dir() => {
                return Err(Error::FailedPrecondition {
                    path: path.into(),
                    reason: "is a directory".into(),
                });
            }
            Ok(_) if no_overwrite => return Err(Error::AlreadyExists { path: path.into() }),
            _ => {}
        }
        let p = path.to_string();
        let (file, temp) = tokio::task::spawn_blocking(move || {
            std::fs::create_dir_all(&parent)?;
            tempfile::Builder::new()
                .prefix(".capsa-upload-")
                .tempfile_in(&parent)
        })
        .await
        .expect("upload setup does not panic")
        .map_err(|e| Error::fs("create", &p, e))?
        .into_parts();
        Ok(Upload {
            path: path.into(),
            dest,
            mode,
            no_overwrite,
            file: tokio::fs::File::from_std(file),
            temp,
            hasher: Sha256::new(),
        })
    }

    pub async fn write(&mut self, data: &[u8]) -> Result<(), Error> {
        if data.len() > MAX_CHUNK_BYTES {
            return Err(Error::invalid(
                "data",
                format!("chunk of {} bytes exceeds {MAX_CHUNK_BYTES}", data.len()),
            ));
        }
        self.hasher.update(data);
        self.file
            .write_all(data)
            .await
            .map_err(|e| Error::fs("write", &self.path, e))
    }

    /// Applies the mode, renames the file into place and returns it with the sha256 of
    /// the bytes received.
    pub async fn finish(mut self) -> Result<(FileInfo, String), Error> {
        let path = self.path.clone();
        self.file
            .flush()
            .await
            .map_err(|e| Error::fs("write", &path, e))?;
        self.file
            .set_permissions(std::fs::Permissions::from_mode(self.mode))
            .await
            .map_err(|e| Error::fs("chmod", &path, e))?;
        drop(self.file);
        let (temp, dest, no_overwrite) = (self.temp, self.dest.clone(), self.no_overwrite);
        tokio::task::spawn_blocking(move || {
            if no_overwrite {
                temp.persist_noclobber(&dest)
            } else {
                temp.persist(&dest)
            }
        })
        .await
        .expect("rename does not panic")
        .map_err(|e| Error::fs("rename", &path, e.error))?;
        let sha = hex::encode(self.hasher.finalize());
        Ok((info(&path).await?, sha))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_checked() {
        assert!(check_path("path", "/ok").is_ok());
        for bad in ["", "rel/ative", "/nul\0byte"] {
            let e = check_path("path", bad).unwrap_err();
            assert!(e.to_string().contains("`path`"), "{e}");
        }
        assert!(check_path("path", &format!("/{}", "a".repeat(MAX_PATH_BYTES))).is_err());
    }

    #[test]
    fn modes_default_and_are_bounded() {
        assert_eq!(check_mode(0, 0o644).unwrap(), 0o644);
        assert_eq!(check_mode(0o4755, 0o644).unwrap(), 0o4755);
        assert!(check_mode(0o10000, 0o644).is_err());
    }

    #[tokio::test]
    async fn an_abandoned_upload_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/f.bin");
        let mut up = Upload::begin(path.to_str().unwrap(), 0, false)
            .await
            .unwrap();
        up.write(b"partial").await.unwrap();
        drop(up);
        assert!(!path.exists());
        let left: Vec<_> = std::fs::read_dir(dir.path().join("sub")).unwrap().collect();
        assert!(left.is_empty(), "{left:?}");
    }
}
