//! The storage backend: unftp-sbe-fs rooted at the data directory, wrapped to add what a site
//! volume needs. Uploads are atomic (hidden temporary file, fsync, rename), created files and
//! directories get fixed modes, read-only users cannot change anything, and every transfer is
//! logged with its user, peer, path, size, duration and result.

use std::{
    fmt::Debug,
    io,
    os::unix::fs::PermissionsExt as _,
    path::{Component, Path, PathBuf},
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Instant,
};

use async_trait::async_trait;
use cap_std::fs::{Dir, OpenOptions, OpenOptionsExt as _};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWriteExt as _, ReadBuf};
use unftp_core::storage::{self, Error, ErrorKind, Fileinfo, StorageBackend};
use unftp_sbe_fs::{Filesystem, Meta};

use crate::auth::FtpUser;

/// Name prefix of in-flight uploads. Such names are hidden from listings and rejected in every
/// command, so a client can neither see nor touch a half-written file.
pub const TEMP_PREFIX: &str = ".ftpsd-upload-";

/// Copy buffer for uploads.
const UPLOAD_BUFFER: usize = 256 * 1024;

/// Settings shared by every session.
#[derive(Debug, Clone)]
pub struct StorageOptions {
    /// Absolute, canonical data directory.
    pub data_dir: PathBuf,
    pub atomic_uploads: bool,
    pub file_mode: u32,
    pub dir_mode: u32,
}

/// One session's view of the volume.
#[derive(Debug)]
pub struct SiteStorage {
    /// `None` when the data directory could not be opened for this session; every call then fails
    /// with 451 instead of panicking inside libunftp's session factory.
    inner: Option<Filesystem>,
    /// The same directory as `inner`'s root, narrowed to the user's home after login.
    root: Option<Arc<Dir>>,
    options: Arc<StorageOptions>,
    session: SessionLog,
}

/// libunftp creates one storage per control connection and drops it when the session ends, so
/// the storage's life is the session's life.
#[derive(Debug)]
struct SessionLog {
    started: Instant,
    user: Option<String>,
    peer: Option<std::net::IpAddr>,
}

impl Drop for SiteStorage {
    fn drop(&mut self) {
        crate::metrics::SESSIONS_ACTIVE.dec();
        tracing::info!(
            user = self.session.user.as_deref(),
            peer = self.session.peer.map(|peer| peer.to_string()),
            duration_ms = self.session.started.elapsed().as_millis() as u64,
            "session ended"
        );
    }
}

impl SiteStorage {
    pub fn new(options: Arc<StorageOptions>) -> Self {
        crate::metrics::SESSIONS_ACTIVE.inc();
        let session = SessionLog {
            started: Instant::now(),
            user: None,
            peer: None,
        };
        let opened = Filesystem::new(options.data_dir.clone()).and_then(|inner| {
            let root = Dir::open_ambient_dir(&options.data_dir, cap_std::ambient_authority())?;
            Ok((inner, Arc::new(root)))
        });
        match opened {
            Ok((inner, root)) => SiteStorage {
                inner: Some(inner),
                root: Some(root),
                options,
                session,
            },
            Err(error) => {
                tracing::error!(data_dir = %options.data_dir.display(), %error, "cannot open the data directory for a new session");
                SiteStorage {
                    inner: None,
                    root: None,
                    options,
                    session,
                }
            }
        }
    }

    fn inner(&self) -> storage::Result<&Filesystem> {
        self.inner.as_ref().ok_or_else(|| Error::from(ErrorKind::LocalError))
    }

    fn root(&self) -> storage::Result<Arc<Dir>> {
        self.root.clone().ok_or_else(|| Error::from(ErrorKind::LocalError))
    }
}

/// Removes the leading `/` that libunftp puts on absolute client paths; the root then stands for `.`.
fn relative(path: &Path) -> PathBuf {
    let stripped = path.strip_prefix("/").unwrap_or(path);
    if stripped.as_os_str().is_empty() {
        PathBuf::from(".")
    } else {
        stripped.to_path_buf()
    }
}

fn is_temp_name(path: &Path) -> bool {
    path.components()
        .any(|component| matches!(component, Component::Normal(name) if name.to_string_lossy().starts_with(TEMP_PREFIX)))
}

/// Rejects names of in-flight uploads with 550, as if they did not exist.
fn reject_temp(path: &Path) -> storage::Result<()> {
    if is_temp_name(path) {
        Err(Error::from(ErrorKind::PermanentFileNotAvailable))
    } else {
        Ok(())
    }
}

fn require_writable(user: &FtpUser) -> storage::Result<()> {
    if user.read_only {
        Err(Error::from(ErrorKind::PermissionDenied))
    } else {
        Ok(())
    }
}

/// Runs blocking file-system work off the async worker threads.
async fn blocking<T, F>(work: F) -> io::Result<T>
where
    F: FnOnce() -> io::Result<T> + Send + 'static,
    T: Send + 'static,
{
    tokio::task::spawn_blocking(work).await.map_err(io::Error::other)?
}

#[async_trait]
impl StorageBackend<FtpUser> for SiteStorage {
    type Metadata = Meta;

    fn enter(&mut self, user: &FtpUser) -> io::Result<()> {
        self.session.user = Some(user.name.clone());
        self.session.peer = user.peer;
        let inner = self.inner.as_mut().ok_or_else(|| io::Error::other("data directory is not open"))?;
        StorageBackend::<FtpUser>::enter(inner, user)?;
        if let (Some(home), Some(root)) = (&user.home, &self.root) {
            let relative_home = home
                .strip_prefix(&self.options.data_dir)
                .map_err(|_| io::Error::other("home directory is outside the data directory"))?;
            self.root = Some(Arc::new(root.open_dir(relative_home)?));
        }
        Ok(())
    }

    fn supported_features(&self) -> u32 {
        storage::FEATURE_RESTART | storage::FEATURE_SITEMD5
    }

    async fn metadata<P: AsRef<Path> + Send + Debug>(&self, user: &FtpUser, path: P) -> storage::Result<Meta> {
        reject_temp(path.as_ref())?;
        self.inner()?.metadata(user, path).await
    }

    async fn list<P>(&self, user: &FtpUser, path: P) -> storage::Result<Vec<Fileinfo<PathBuf, Meta>>>
    where
        P: AsRef<Path> + Send + Debug,
    {
        reject_temp(path.as_ref())?;
        let mut entries = self.inner()?.list(user, path).await?;
        entries.retain(|entry| !is_temp_name(&entry.path));
        Ok(entries)
    }

    async fn get<P: AsRef<Path> + Send + Debug>(
        &self,
        user: &FtpUser,
        path: P,
        start_pos: u64,
    ) -> storage::Result<Box<dyn AsyncRead + Send + Sync + Unpin>> {
        reject_temp(path.as_ref())?;
        let path_text = path.as_ref().display().to_string();
        let reader = self.inner()?.get(user, path, start_pos).await?;
        Ok(Box::new(LoggedReader {
            inner: reader,
            log: TransferLog::new(user, path_text, "download", start_pos),
            finished: false,
            bytes: 0,
        }))
    }

    async fn put<P: AsRef<Path> + Send + Debug, R: AsyncRead + Send + Sync + Unpin + 'static>(
        &self,
        user: &FtpUser,
        input: R,
        path: P,
        start_pos: u64,
    ) -> storage::Result<u64> {
        if let Err(refusal) = require_writable(user).and_then(|()| reject_temp(path.as_ref())) {
            return Err(refuse_upload(input, refusal).await);
        }
        let root = self.root()?;
        let target = relative(path.as_ref());
        let log = TransferLog::new(user, path.as_ref().display().to_string(), "upload", start_pos);

        let result = if self.options.atomic_uploads {
            put_atomic(root, &target, input, start_pos, self.options.file_mode).await
        } else {
            put_in_place(root, &target, input, start_pos, self.options.file_mode).await
        };

        match &result {
            Ok(bytes) => log.finish(*bytes, "ok"),
            Err((bytes, error)) => log.finish_failed(*bytes, error),
        }
        result.map_err(|(_, error)| Error::from(error))
    }

    async fn del<P: AsRef<Path> + Send + Debug>(&self, user: &FtpUser, path: P) -> storage::Result<()> {
        require_writable(user)?;
        reject_temp(path.as_ref())?;
        self.inner()?.del(user, path).await
    }

    async fn mkd<P: AsRef<Path> + Send + Debug>(&self, user: &FtpUser, path: P) -> storage::Result<()> {
        require_writable(user)?;
        reject_temp(path.as_ref())?;
        let root = self.root()?;
        let target = relative(path.as_ref());
        let mode = self.options.dir_mode;
        blocking(move || {
            root.create_dir(&target)?;
            // Set the mode explicitly: create_dir applies the process umask.
            root.set_permissions(&target, cap_std::fs::Permissions::from_std(std::fs::Permissions::from_mode(mode)))
        })
        .await
        .map_err(Error::from)
    }

    async fn rename<P: AsRef<Path> + Send + Debug>(&self, user: &FtpUser, from: P, to: P) -> storage::Result<()> {
        require_writable(user)?;
        reject_temp(from.as_ref())?;
        reject_temp(to.as_ref())?;
        self.inner()?.rename(user, from, to).await
    }

    async fn rmd<P: AsRef<Path> + Send + Debug>(&self, user: &FtpUser, path: P) -> storage::Result<()> {
        require_writable(user)?;
        reject_temp(path.as_ref())?;
        self.inner()?.rmd(user, path).await
    }

    async fn cwd<P: AsRef<Path> + Send + Debug>(&self, user: &FtpUser, path: P) -> storage::Result<()> {
        reject_temp(path.as_ref())?;
        self.inner()?.cwd(user, path).await
    }
}

/// Bytes and time a refused upload may take before the server stops reading it.
const REFUSED_UPLOAD_DRAIN_BYTES: u64 = 16 * 1024 * 1024;
const REFUSED_UPLOAD_DRAIN_TIME: std::time::Duration = std::time::Duration::from_secs(5);

/// Reads and discards a refused upload before the refusal is returned. libunftp has already sent
/// 150 and the client is writing; closing at once would hand the client a broken pipe in place of
/// the 550 reply. Large refused uploads are cut after a bounded drain.
async fn refuse_upload<R: AsyncRead + Unpin>(input: R, refusal: Error) -> Error {
    let mut limited = input.take(REFUSED_UPLOAD_DRAIN_BYTES);
    let _ = tokio::time::timeout(REFUSED_UPLOAD_DRAIN_TIME, tokio::io::copy(&mut limited, &mut tokio::io::sink())).await;
    refusal
}

/// Failed upload: the bytes received before the failure, and the cause.
type UploadError = (u64, io::Error);

fn open_options(mode: u32) -> OpenOptions {
    let mut options = OpenOptions::new();
    options.write(true).mode(mode);
    options
}

/// Writes the upload into a hidden temporary file beside the target and renames it over the target
/// only after every byte arrived and reached the disk. On any failure the temporary file is removed
/// and the target keeps its previous content, or stays absent.
async fn put_atomic<R: AsyncRead + Unpin>(
    root: Arc<Dir>,
    target: &Path,
    mut input: R,
    start_pos: u64,
    mode: u32,
) -> Result<u64, UploadError> {
    let parent = target.parent().map(Path::to_path_buf).unwrap_or_default();
    let temp = parent.join(format!("{TEMP_PREFIX}{:016x}", rand::random::<u64>()));

    let file = {
        let (root, temp, target) = (root.clone(), temp.clone(), target.to_path_buf());
        blocking(move || {
            let mut options = open_options(mode);
            options.create_new(true);
            let temp_file = root.open_with(&temp, &options)?;
            if start_pos > 0 {
                // A resumed or appended upload keeps the first start_pos bytes of the current file.
                let existing = root.open(&target)?;
                if existing.metadata()?.len() < start_pos {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        "restart position is past the end of the file",
                    ));
                }
                let mut source = io::Read::take(existing.into_std(), start_pos);
                let mut destination = temp_file.try_clone()?.into_std();
                io::copy(&mut source, &mut destination)?;
            }
            Ok(temp_file)
        })
        .await
    };
    let file = match file {
        Ok(file) => file,
        Err(error) => {
            remove_quietly(root, temp).await;
            return Err((0, error));
        }
    };

    let mut file = tokio::fs::File::from_std(file.into_std());
    if start_pos > 0
        && let Err(error) = file.seek(io::SeekFrom::Start(start_pos)).await
    {
        remove_quietly(root, temp).await;
        return Err((0, error));
    }

    let copied = copy_all(&mut input, &mut file).await;
    let finished = match copied {
        Ok(bytes) => match finish_file(&mut file, mode).await {
            Ok(()) => Ok(bytes),
            Err(error) => Err((bytes, error)),
        },
        Err(failure) => Err(failure),
    };
    drop(file);

    let bytes = match finished {
        Ok(bytes) => bytes,
        Err(failure) => {
            remove_quietly(root, temp).await;
            return Err(failure);
        }
    };

    let (rename_root, rename_temp, rename_target) = (root.clone(), temp.clone(), target.to_path_buf());
    match blocking(move || rename_root.rename(&rename_temp, &rename_root, &rename_target)).await {
        Ok(()) => Ok(bytes),
        Err(error) => {
            remove_quietly(root, temp).await;
            Err((bytes, error))
        }
    }
}

/// Writes straight into the target, the classic FTP way. What arrived before a failure is flushed
/// to disk, so that a client can resume with REST from the size it sees.
async fn put_in_place<R: AsyncRead + Unpin>(
    root: Arc<Dir>,
    target: &Path,
    mut input: R,
    start_pos: u64,
    mode: u32,
) -> Result<u64, UploadError> {
    let target = target.to_path_buf();
    let file = blocking(move || {
        let mut options = open_options(mode);
        options.create(true);
        root.open_with(&target, &options)
    })
    .await
    .map_err(|error| (0, error))?;

    let mut file = tokio::fs::File::from_std(file.into_std());
    file.set_len(start_pos).await.map_err(|error| (0, error))?;
    file.seek(io::SeekFrom::Start(start_pos)).await.map_err(|error| (0, error))?;

    let copied = copy_all(&mut input, &mut file).await;
    let finished = finish_file(&mut file, mode).await;
    match (copied, finished) {
        (Ok(bytes), Ok(())) => Ok(bytes),
        (Ok(bytes), Err(error)) => Err((bytes, error)),
        (Err(failure), _) => Err(failure),
    }
}

use tokio::io::AsyncSeekExt as _;

/// Copies until end of input. Every byte read is written before an error is returned, so the count
/// in the error is what reached the file.
async fn copy_all<R: AsyncRead + Unpin>(input: &mut R, file: &mut tokio::fs::File) -> Result<u64, UploadError> {
    let mut buffer = vec![0_u8; UPLOAD_BUFFER];
    let mut total = 0_u64;
    loop {
        let read = match input.read(&mut buffer).await {
            Ok(0) => return Ok(total),
            Ok(read) => read,
            Err(error) => return Err((total, error)),
        };
        if let Err(error) = file.write_all(&buffer[..read]).await {
            return Err((total, error));
        }
        total += read as u64;
    }
}

/// Flushes data to the disk and sets the final mode, whatever the process umask was.
async fn finish_file(file: &mut tokio::fs::File, mode: u32) -> io::Result<()> {
    file.flush().await?;
    file.sync_all().await?;
    file.set_permissions(std::fs::Permissions::from_mode(mode)).await
}

async fn remove_quietly(root: Arc<Dir>, temp: PathBuf) {
    let shown = temp.display().to_string();
    if let Err(error) = blocking(move || root.remove_file(&temp)).await
        && error.kind() != io::ErrorKind::NotFound
    {
        tracing::error!(path = %shown, %error, "cannot remove a temporary upload file");
    }
}

/// Removes temporary upload files that a crash left behind anywhere under the data directory.
pub fn remove_stale_uploads(data_dir: &Path) -> usize {
    let mut removed = 0;
    for entry in walkdir::WalkDir::new(data_dir)
        .follow_links(false)
        .into_iter()
        .filter_map(Result::ok)
    {
        if entry.file_type().is_file() && entry.file_name().to_string_lossy().starts_with(TEMP_PREFIX) {
            match std::fs::remove_file(entry.path()) {
                Ok(()) => removed += 1,
                Err(error) => tracing::warn!(path = %entry.path().display(), %error, "cannot remove a stale temporary upload file"),
            }
        }
    }
    removed
}

/// Emits the one info line per transfer.
struct TransferLog {
    user: String,
    peer: String,
    path: String,
    direction: &'static str,
    offset: u64,
    started: Instant,
}

impl TransferLog {
    fn new(user: &FtpUser, path: String, direction: &'static str, offset: u64) -> Self {
        TransferLog {
            user: user.name.clone(),
            peer: user.peer.map(|peer| peer.to_string()).unwrap_or_default(),
            path,
            direction,
            offset,
            started: Instant::now(),
        }
    }

    fn finish(&self, bytes: u64, result: &'static str) {
        crate::metrics::record_transfer(self.direction, result, bytes, self.started.elapsed());
        tracing::info!(
            user = %self.user,
            peer = %self.peer,
            path = %self.path,
            direction = self.direction,
            bytes,
            offset = self.offset,
            duration_ms = self.started.elapsed().as_millis() as u64,
            result,
            "transfer finished"
        );
    }

    fn finish_failed(&self, bytes: u64, error: &io::Error) {
        crate::metrics::record_transfer(self.direction, "failed", bytes, self.started.elapsed());
        tracing::info!(
            user = %self.user,
            peer = %self.peer,
            path = %self.path,
            direction = self.direction,
            bytes,
            offset = self.offset,
            duration_ms = self.started.elapsed().as_millis() as u64,
            result = "failed",
            %error,
            "transfer finished"
        );
    }
}

/// Counts the bytes of a download and logs the transfer when libunftp drops the reader.
struct LoggedReader {
    inner: Box<dyn AsyncRead + Send + Sync + Unpin>,
    log: TransferLog,
    finished: bool,
    bytes: u64,
}

impl AsyncRead for LoggedReader {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = poll {
            let read = buf.filled().len() - before;
            if read == 0 {
                self.finished = true;
            }
            self.bytes += read as u64;
        }
        poll
    }
}

impl Drop for LoggedReader {
    fn drop(&mut self) {
        self.log.finish(self.bytes, if self.finished { "ok" } else { "incomplete" });
    }
}
