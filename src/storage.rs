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
use cap_std::fs::{Dir, MetadataExt as _, OpenOptions, OpenOptionsExt as _};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncSeekExt as _, AsyncWriteExt as _, ReadBuf};
use unftp_core::storage::{self, Error, ErrorKind, Fileinfo, Metadata, Permissions, StorageBackend};
use unftp_sbe_fs::Filesystem;

use crate::auth::FtpUser;

/// Name prefix of in-flight uploads. Such names are hidden from listings and rejected in every
/// command, so a client can neither see nor touch a half-written file.
pub const TEMP_PREFIX: &str = ".ftpsd-upload-";

/// Copy buffer for uploads.
const UPLOAD_BUFFER: usize = 256 * 1024;

/// The setgid bit. On a directory it makes new entries inherit the directory's group, which is how
/// a Kubernetes fsGroup volume keeps every upload in the group that the web server reads with.
const SETGID: u32 = 0o2000;

/// Metadata of a file or directory, as listings, SIZE and MDTM report it. unftp-sbe-fs's own type
/// cannot be built outside that crate, and listings are read here (see `list_directory`).
#[derive(Debug)]
pub struct SiteMeta {
    inner: cap_std::fs::Metadata,
    /// Target of a symbolic link.
    target: Option<PathBuf>,
}

impl Metadata for SiteMeta {
    fn len(&self) -> u64 {
        self.inner.len()
    }

    fn is_dir(&self) -> bool {
        self.inner.is_dir()
    }

    fn is_file(&self) -> bool {
        self.inner.is_file()
    }

    fn is_symlink(&self) -> bool {
        self.inner.file_type().is_symlink()
    }

    fn modified(&self) -> storage::Result<std::time::SystemTime> {
        self.inner.modified().map(cap_std::time::SystemTime::into_std).map_err(Error::from)
    }

    fn gid(&self) -> u32 {
        self.inner.gid()
    }

    fn uid(&self) -> u32 {
        self.inner.uid()
    }

    fn links(&self) -> u64 {
        self.inner.nlink()
    }

    fn permissions(&self) -> Permissions {
        Permissions(self.inner.mode())
    }

    fn readlink(&self) -> Option<&Path> {
        self.target.as_deref()
    }
}

/// Reads the metadata of `path` without following a final symbolic link.
fn read_metadata(root: &Dir, path: &Path) -> io::Result<SiteMeta> {
    let inner = root.symlink_metadata(path)?;
    let target = if inner.is_symlink() {
        root.read_link_contents(path).ok()
    } else {
        None
    };
    Ok(SiteMeta { inner, target })
}

/// Lists a directory without temporary upload files. An entry that disappears between reading the
/// directory and reading its metadata is left out: that is what a concurrent atomic upload does to
/// its temporary file, and a deleted file looks the same. unftp-sbe-fs fails the whole listing then.
fn list_directory(root: &Dir, directory: &Path) -> io::Result<Vec<Fileinfo<PathBuf, SiteMeta>>> {
    let mut entries = Vec::new();
    for entry in root.read_dir(directory)? {
        let name = PathBuf::from(entry?.file_name());
        if is_temp_name(&name) {
            continue;
        }
        match read_metadata(root, &directory.join(&name)) {
            Ok(metadata) => entries.push(Fileinfo { path: name, metadata }),
            Err(error) if error.kind() == io::ErrorKind::NotFound => {}
            Err(error) => return Err(error),
        }
    }
    Ok(entries)
}

/// Settings shared by every session.
#[derive(Debug, Clone)]
pub struct StorageOptions {
    /// Absolute, canonical data directory.
    pub data_dir: PathBuf,
    pub atomic_uploads: bool,
    pub file_mode: u32,
    pub dir_mode: u32,
    /// The users, whose home directories no session may remove or rename; `None` protects nothing.
    pub users: Option<Arc<crate::auth::Users>>,
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

    /// Rejects, with 550, removing or renaming a directory that is a user's home or contains one.
    /// Without this, a user whose root is the data directory could delete another user's home,
    /// and that user could not log in again until the next start.
    fn reject_home(&self, user: &FtpUser, path: &Path) -> storage::Result<()> {
        let Some(users) = &self.options.users else {
            return Ok(());
        };
        let session_root = user.home.clone().unwrap_or_else(|| self.options.data_dir.clone());
        let target = lexical_join(&session_root, path);
        let protected = users.current().homes().into_iter().map(|home| self.options.data_dir.join(home));
        for home in protected {
            if home.starts_with(&target) && target != session_root {
                tracing::warn!(user = %user.name, path = ?path, home = ?home, "rejected removing or renaming a home directory");
                return Err(Error::from(ErrorKind::PermissionDenied));
            }
        }
        Ok(())
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

/// Joins a client path onto `root` and resolves `.` and `..` without touching the file system,
/// never climbing above `root` (cap-std rejects such paths anyway).
fn lexical_join(root: &Path, path: &Path) -> PathBuf {
    let mut joined = root.to_path_buf();
    for component in path.components() {
        match component {
            Component::Normal(name) => joined.push(name),
            Component::ParentDir => {
                if joined != root {
                    joined.pop();
                }
            }
            Component::CurDir | Component::RootDir | Component::Prefix(_) => {}
        }
    }
    joined
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
    type Metadata = SiteMeta;

    fn enter(&mut self, user: &FtpUser) -> io::Result<()> {
        self.session.user = Some(user.name.clone());
        self.session.peer = user.peer;
        if let (Some(home), Some(root)) = (&user.home, &self.root) {
            let relative_home = home
                .strip_prefix(&self.options.data_dir)
                .map_err(|_| io::Error::other(format!("home directory {} is outside the data directory", home.display())))?;
            // A home removed since start-up (by hand, or by a wiped volume) is created again, so its
            // user can still log in.
            if matches!(root.symlink_metadata(relative_home), Err(error) if error.kind() == io::ErrorKind::NotFound) {
                root.create_dir_all(relative_home)?;
                set_dir_mode(home, self.options.dir_mode)?;
                tracing::warn!(user = %user.name, home = %home.display(), "created the missing home directory");
            }
            let opened = root.open_dir(relative_home).map_err(|error| {
                io::Error::new(
                    error.kind(),
                    format!("cannot open home directory {} of user {}: {error}", home.display(), user.name),
                )
            })?;
            self.root = Some(Arc::new(opened));
        }
        let inner = self.inner.as_mut().ok_or_else(|| io::Error::other("data directory is not open"))?;
        StorageBackend::<FtpUser>::enter(inner, user)?;
        Ok(())
    }

    fn supported_features(&self) -> u32 {
        storage::FEATURE_RESTART | storage::FEATURE_SITEMD5
    }

    async fn metadata<P: AsRef<Path> + Send + Debug>(&self, _user: &FtpUser, path: P) -> storage::Result<SiteMeta> {
        reject_temp(path.as_ref())?;
        let root = self.root()?;
        let path = relative(path.as_ref());
        // Every failure is a 550, as in unftp-sbe-fs: SIZE, MDTM and RNFR report a missing file.
        blocking(move || read_metadata(&root, &path))
            .await
            .map_err(|error| Error::new(ErrorKind::PermanentFileNotAvailable, error))
    }

    async fn list<P>(&self, _user: &FtpUser, path: P) -> storage::Result<Vec<Fileinfo<PathBuf, SiteMeta>>>
    where
        P: AsRef<Path> + Send + Debug,
    {
        reject_temp(path.as_ref())?;
        let root = self.root()?;
        let directory = relative(path.as_ref());
        blocking(move || list_directory(&root, &directory)).await.map_err(Error::from)
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
        // unftp-sbe-fs reads through a 4 KiB buffer, which costs one blocking-pool round trip per
        // 4 KiB. A larger buffer on top issues big reads, and tokio's BufReader passes a read
        // larger than its own buffer straight through to the file.
        let reader = tokio::io::BufReader::with_capacity(DOWNLOAD_BUFFER, reader);
        Ok(Box::new(LoggedReader {
            inner: Box::new(reader),
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
        let mut input = input;

        let result = if self.options.atomic_uploads {
            put_atomic(root, &target, &mut input, start_pos, self.options.file_mode).await
        } else {
            put_in_place(root, &target, &mut input, start_pos, self.options.file_mode).await
        };

        match result {
            Ok(bytes) => {
                log.finish(bytes, "ok");
                Ok(bytes)
            }
            Err(failure) => {
                log.finish_failed(failure.bytes, &failure.error);
                let error = Error::from(failure.error);
                if failure.input_failed {
                    Err(error)
                } else {
                    // The volume failed (a full disk, say) while the client is still sending.
                    Err(refuse_upload(input, error).await)
                }
            }
        }
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
            let current = cap_std::fs::PermissionsExt::mode(&root.metadata(&target)?.permissions());
            root.set_permissions(
                &target,
                <cap_std::fs::Permissions as cap_std::fs::PermissionsExt>::from_mode(dir_mode_keeping_setgid(current, mode)),
            )
        })
        .await
        .map_err(Error::from)
    }

    async fn rename<P: AsRef<Path> + Send + Debug>(&self, user: &FtpUser, from: P, to: P) -> storage::Result<()> {
        require_writable(user)?;
        reject_temp(from.as_ref())?;
        reject_temp(to.as_ref())?;
        self.reject_home(user, from.as_ref())?;
        self.reject_home(user, to.as_ref())?;
        self.inner()?.rename(user, from, to).await
    }

    async fn rmd<P: AsRef<Path> + Send + Debug>(&self, user: &FtpUser, path: P) -> storage::Result<()> {
        require_writable(user)?;
        reject_temp(path.as_ref())?;
        self.reject_home(user, path.as_ref())?;
        self.inner()?.rmd(user, path).await
    }

    async fn cwd<P: AsRef<Path> + Send + Debug>(&self, _user: &FtpUser, path: P) -> storage::Result<()> {
        reject_temp(path.as_ref())?;
        let root = self.root()?;
        let directory = relative(path.as_ref());
        // Opening the directory proves that it exists, is a directory and is readable. unftp-sbe-fs
        // lists it instead, which fails while uploads rename files in it.
        blocking(move || root.open_dir(&directory).map(drop)).await.map_err(Error::from)
    }
}

/// Returns the mode for a directory that ftpsd created: `mode`, plus the setgid bit when the
/// directory inherited it from its parent. chmod(2) clears a setgid bit that the new mode lacks.
fn dir_mode_keeping_setgid(current: u32, mode: u32) -> u32 {
    mode | (current & SETGID)
}

/// Sets the permission bits of a directory that ftpsd created to `mode`, keeping the setgid bit
/// that it inherited from its parent (see [`SETGID`]). For directories created outside a session,
/// such as users' homes at start-up.
pub fn set_dir_mode(path: &Path, mode: u32) -> io::Result<()> {
    let current = std::fs::metadata(path)?.permissions().mode();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(dir_mode_keeping_setgid(current, mode)))
}

/// Read size for downloads.
const DOWNLOAD_BUFFER: usize = 256 * 1024;

/// Bytes and time a refused upload may take before the server stops reading it.
const REFUSED_UPLOAD_DRAIN_BYTES: u64 = 16 * 1024 * 1024;
const REFUSED_UPLOAD_DRAIN_TIME: std::time::Duration = std::time::Duration::from_secs(5);

/// Reads and discards a refused upload before the refusal is returned. libunftp has already sent
/// 150 and the client is writing, so closing at once would hand the client a broken pipe in place
/// of the 550 reply. Large refused uploads are cut after a bounded drain.
async fn refuse_upload<R: AsyncRead + Unpin>(input: R, refusal: Error) -> Error {
    let mut limited = input.take(REFUSED_UPLOAD_DRAIN_BYTES);
    let _ = tokio::time::timeout(REFUSED_UPLOAD_DRAIN_TIME, tokio::io::copy(&mut limited, &mut tokio::io::sink())).await;
    refusal
}

/// Failed upload.
#[derive(Debug)]
struct UploadError {
    /// Bytes received before the failure.
    bytes: u64,
    error: io::Error,
    /// The client's data connection failed, as opposed to the volume.
    input_failed: bool,
}

impl UploadError {
    fn volume(bytes: u64, error: io::Error) -> Self {
        UploadError {
            bytes,
            error,
            input_failed: false,
        }
    }
}

fn open_options(mode: u32) -> OpenOptions {
    let mut options = OpenOptions::new();
    options.write(true).mode(mode);
    options
}

/// A temporary upload file, removed unless it was renamed over its target. Removal on drop covers
/// a `put` future that libunftp drops mid-transfer (on ABOR, or when the shutdown grace period
/// ends), where no error path runs.
struct TempFile {
    root: Arc<Dir>,
    /// `None` once the file was renamed or removed.
    path: Option<PathBuf>,
}

impl TempFile {
    /// Removes the file and waits for the removal, so that the space is free before the reply.
    async fn remove(mut self) {
        if let Some(path) = self.path.take() {
            let root = self.root.clone();
            let _ = blocking(move || {
                remove_temp(&root, &path);
                Ok(())
            })
            .await;
        }
    }

    /// Marks the file as renamed: nothing is left to remove.
    fn renamed(mut self) {
        self.path = None;
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let Some(path) = self.path.take() else { return };
        let root = self.root.clone();
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn_blocking(move || remove_temp(&root, &path));
            }
            Err(_) => remove_temp(&root, &path),
        }
    }
}

/// Removes a temporary upload file. A file that is already gone is no error.
// NOTE: a removal that fails (or that a runtime shutting down never runs) leaves the file until
// the next start-up, where remove_stale_uploads deletes it.
fn remove_temp(root: &Dir, path: &Path) {
    if let Err(error) = root.remove_file(path)
        && error.kind() != io::ErrorKind::NotFound
    {
        tracing::error!(path = %path.display(), %error, "cannot remove a temporary upload file");
    }
}

/// Writes the upload into a hidden temporary file beside the target and renames it over the target
/// only after every byte arrived and reached the disk. On any failure, and when the future is
/// dropped, the temporary file is removed and the target keeps its previous content, or stays
/// absent.
///
/// Both files are named relative to a handle on the target's directory, opened once: if another
/// session renames that directory during the upload, the file lands in it under its new name.
async fn put_atomic<R: AsyncRead + Unpin>(
    root: Arc<Dir>,
    target: &Path,
    input: &mut R,
    start_pos: u64,
    mode: u32,
) -> Result<u64, UploadError> {
    let parent = target.parent().map(Path::to_path_buf).unwrap_or_default();
    let Some(name) = target.file_name().map(PathBuf::from) else {
        // libunftp joins the argument to the working directory, so only a path such as "/" or
        // "dir/.." gets here.
        return Err(UploadError::volume(0, io::Error::from(io::ErrorKind::IsADirectory)));
    };
    let temp_name = PathBuf::from(format!("{TEMP_PREFIX}{:016x}", rand::random::<u64>()));

    let created = {
        let temp_name = temp_name.clone();
        blocking(move || {
            let directory = if parent.as_os_str().is_empty() {
                root.try_clone()?
            } else {
                root.open_dir(&parent)?
            };
            let mut options = open_options(mode);
            options.create_new(true);
            let file = directory.open_with(&temp_name, &options)?;
            Ok((Arc::new(directory), file))
        })
        .await
    };
    let (directory, file) = created.map_err(|error| UploadError::volume(0, error))?;
    let temp = TempFile {
        root: directory.clone(),
        path: Some(temp_name.clone()),
    };

    let file = if start_pos > 0 {
        let (directory, name) = (directory.clone(), name.clone());
        let copied = blocking(move || {
            copy_prefix(&directory, &name, &file, start_pos)?;
            Ok(file)
        })
        .await;
        match copied {
            Ok(file) => file,
            Err(error) => {
                temp.remove().await;
                return Err(UploadError::volume(0, error));
            }
        }
    } else {
        file
    };

    let mut file = tokio::fs::File::from_std(file.into_std());
    let written = match write_upload(input, &mut file, start_pos).await {
        Ok(bytes) => set_mode(&file, mode)
            .await
            .map(|()| bytes)
            .map_err(|error| UploadError::volume(bytes, error)),
        Err(failure) => Err(failure),
    };
    drop(file);
    let bytes = match written {
        Ok(bytes) => bytes,
        Err(failure) => {
            temp.remove().await;
            return Err(failure);
        }
    };

    match blocking(move || directory.rename(&temp_name, &directory, &name)).await {
        Ok(()) => {
            temp.renamed();
            Ok(bytes)
        }
        Err(error) => {
            temp.remove().await;
            Err(UploadError::volume(bytes, error))
        }
    }
}

/// Copies the first `length` bytes of the current target into the temporary file, so that a
/// resumed (REST) or appended (APPE) upload continues after them.
fn copy_prefix(root: &Dir, target: &Path, temp: &cap_std::fs::File, length: u64) -> io::Result<()> {
    let existing = root.open(target)?;
    if existing.metadata()?.len() < length {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "restart position is past the end of the file",
        ));
    }
    let mut source = io::Read::take(existing.into_std(), length);
    let mut destination = temp.try_clone()?.into_std();
    let copied = io::copy(&mut source, &mut destination)?;
    if copied < length {
        // The file shrank between the size check and the copy.
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the file shrank while its first part was copied",
        ));
    }
    Ok(())
}

/// Writes the input at `start_pos` until end of input, then flushes the file to the disk. Returns
/// the bytes received.
async fn write_upload<R: AsyncRead + Unpin>(input: &mut R, file: &mut tokio::fs::File, start_pos: u64) -> Result<u64, UploadError> {
    file.seek(io::SeekFrom::Start(start_pos))
        .await
        .map_err(|error| UploadError::volume(0, error))?;
    let bytes = copy_all(input, file).await?;
    sync_file(file).await.map_err(|error| UploadError::volume(bytes, error))?;
    Ok(bytes)
}

/// Writes straight into the target, the classic FTP way. What arrived before a failure is flushed
/// to disk, so that a client can resume with REST from the size that SIZE reports.
async fn put_in_place<R: AsyncRead + Unpin>(
    root: Arc<Dir>,
    target: &Path,
    input: &mut R,
    start_pos: u64,
    mode: u32,
) -> Result<u64, UploadError> {
    let target_shown = target.display().to_string();
    let target = target.to_path_buf();
    let file = blocking(move || {
        let mut options = open_options(mode);
        options.create(true);
        root.open_with(&target, &options)
    })
    .await
    .map_err(|error| UploadError::volume(0, error))?;

    let mut file = tokio::fs::File::from_std(file.into_std());
    file.set_len(start_pos).await.map_err(|error| UploadError::volume(0, error))?;
    let written = write_upload(input, &mut file, start_pos).await;
    if let Err(failure) = &written
        && failure.input_failed
        && let Err(error) = sync_file(&mut file).await
    {
        tracing::warn!(path = %target_shown, %error, "cannot flush the received part of a failed upload");
    }

    // The mode is set on a partial file too, so that it is readable like any other.
    let mode_set = set_mode(&file, mode).await;
    let bytes = written?;
    match mode_set {
        Ok(()) => Ok(bytes),
        // An existing file of another uid keeps its mode: only the owner may change it, and the
        // content was written all the same.
        Err(error) if error.kind() == io::ErrorKind::PermissionDenied => {
            tracing::warn!(path = %target_shown, %error, "cannot set the mode of a file that another user owns");
            Ok(bytes)
        }
        Err(error) => Err(UploadError::volume(bytes, error)),
    }
}

/// Copies until end of input. Every byte read is written before an error is returned, so the count
/// in the error is what reached the file.
async fn copy_all<R: AsyncRead + Unpin>(input: &mut R, file: &mut tokio::fs::File) -> Result<u64, UploadError> {
    let mut buffer = vec![0_u8; UPLOAD_BUFFER];
    let mut total = 0_u64;
    loop {
        let read = match input.read(&mut buffer).await {
            Ok(0) => return Ok(total),
            Ok(read) => read,
            Err(error) => {
                return Err(UploadError {
                    bytes: total,
                    error,
                    input_failed: true,
                });
            }
        };
        if let Err(error) = file.write_all(&buffer[..read]).await {
            return Err(UploadError::volume(total, error));
        }
        total += read as u64;
    }
}

/// Flushes the file's data to the disk.
async fn sync_file(file: &mut tokio::fs::File) -> io::Result<()> {
    file.flush().await?;
    file.sync_all().await
}

/// Sets the final mode of an uploaded file, whatever the process umask was when it was created.
async fn set_mode(file: &tokio::fs::File, mode: u32) -> io::Result<()> {
    file.set_permissions(std::fs::Permissions::from_mode(mode)).await
}

/// Removes temporary upload files that a crash left behind anywhere under the data directory.
// NOTE: this also removes the in-flight uploads of any other ftpsd process that serves the same
// volume, so two processes must never share a data directory.
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
            path = %self.path.escape_debug(),
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
            path = %self.path.escape_debug(),
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn open_root(path: &Path) -> Arc<Dir> {
        Arc::new(Dir::open_ambient_dir(path, cap_std::ambient_authority()).unwrap())
    }

    fn names(path: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(path)
            .unwrap()
            .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    /// Input that fails as a data connection closed without TLS close_notify does.
    struct Truncated;

    impl AsyncRead for Truncated {
        fn poll_read(self: Pin<&mut Self>, _: &mut Context<'_>, _: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Err(io::Error::from(io::ErrorKind::UnexpectedEof)))
        }
    }

    /// Upload input that yields `data`, then fails.
    fn failing_input(data: &'static [u8]) -> impl AsyncRead + Unpin {
        tokio::io::AsyncReadExt::chain(data, Truncated)
    }

    #[test]
    fn setgid_bit_is_kept_only_when_inherited() {
        assert_eq!(dir_mode_keeping_setgid(0o42700, 0o750), 0o2750);
        assert_eq!(dir_mode_keeping_setgid(0o40700, 0o755), 0o755);
    }

    #[test]
    fn listing_leaves_out_temporary_files() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("page.html"), b"page").unwrap();
        std::fs::write(dir.path().join(format!("{TEMP_PREFIX}0011223344556677")), b"half").unwrap();
        std::fs::write(dir.path().join(".htaccess"), b"dot file").unwrap();

        let root = open_root(dir.path());
        let mut listed: Vec<String> = list_directory(&root, Path::new("."))
            .unwrap()
            .into_iter()
            .map(|entry| entry.path.to_string_lossy().into_owned())
            .collect();
        listed.sort();

        assert_eq!(listed, [".htaccess", "page.html"]);
    }

    #[tokio::test]
    async fn failed_upload_keeps_old_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("page.html"), b"old").unwrap();

        let mut input = failing_input(b"new content that never completes");
        let failure = put_atomic(open_root(dir.path()), Path::new("page.html"), &mut input, 0, 0o644)
            .await
            .unwrap_err();

        assert!(failure.input_failed);
        assert_eq!(failure.bytes, 32);
        assert_eq!(std::fs::read(dir.path().join("page.html")).unwrap(), b"old");
        assert_eq!(names(dir.path()), ["page.html"]);
    }

    #[tokio::test]
    async fn dropped_upload_removes_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let root = open_root(dir.path());
        // The writer half stays open, so the upload waits for more data until it is aborted.
        let (mut writer, mut reader) = tokio::io::duplex(1024);
        writer.write_all(b"first part").await.unwrap();
        let upload = tokio::spawn(async move { put_atomic(root, Path::new("page.html"), &mut reader, 0, 0o644).await });

        let temp_exists = || names(dir.path()).iter().any(|name| name.starts_with(TEMP_PREFIX));
        let deadline = Instant::now() + Duration::from_secs(10);
        while !temp_exists() {
            assert!(Instant::now() < deadline, "no temporary file appeared");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        upload.abort();
        let _ = upload.await;

        let deadline = Instant::now() + Duration::from_secs(10);
        while temp_exists() {
            assert!(Instant::now() < deadline, "the temporary file was not removed");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(names(dir.path()).is_empty());
        drop(writer);
    }

    #[tokio::test]
    async fn resumed_upload_keeps_first_part() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("page.html"), b"hello world").unwrap();

        let mut input: &[u8] = b"there";
        let bytes = put_atomic(open_root(dir.path()), Path::new("page.html"), &mut input, 6, 0o600)
            .await
            .unwrap();

        assert_eq!(bytes, 5);
        assert_eq!(std::fs::read(dir.path().join("page.html")).unwrap(), b"hello there");
        let mode = std::fs::metadata(dir.path().join("page.html")).unwrap().permissions().mode();
        assert_eq!(mode & 0o7777, 0o600);
        assert_eq!(names(dir.path()), ["page.html"]);
    }

    #[tokio::test]
    async fn restart_past_end_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("page.html"), b"short").unwrap();

        let mut input: &[u8] = b"tail";
        let failure = put_atomic(open_root(dir.path()), Path::new("page.html"), &mut input, 100, 0o644)
            .await
            .unwrap_err();

        assert_eq!(failure.error.kind(), io::ErrorKind::InvalidInput);
        assert_eq!(std::fs::read(dir.path().join("page.html")).unwrap(), b"short");
        assert_eq!(names(dir.path()), ["page.html"]);
    }
}
