//! Live reload of the certificate and the users file, on file change and on SIGHUP. A file that
//! fails to load is logged at error and the previous version stays in use.
//!
//! The parent directory of each file is watched, not the file itself. Kubernetes updates a
//! mounted Secret or ConfigMap by writing a new `..<timestamp>` directory and renaming a
//! `..data_tmp` symlink over `..data`. The file name is a symlink through `..data`, so a watch on
//! the file would follow the old inode, which the kubelet deletes, and miss every later swap.

use std::{
    collections::{BTreeSet, hash_map::DefaultHasher},
    ffi::OsString,
    hash::{Hash, Hasher},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use notify::{RecursiveMode, Watcher as _};
use tokio::sync::mpsc;

use crate::{
    auth::Users,
    config::Config,
    metrics,
    telemetry::xferlog,
    tls::{self, CertificateFiles, CertificateStore},
};

/// Quiet time after the last file event before reloading. A certificate and its key are two
/// files, and editors and the kubelet write them in several steps. Reloading after the burst
/// avoids loading a new certificate with the old key.
const SETTLE_TIME: Duration = Duration::from_millis(500);

/// The cause of a reload, for the log line.
#[derive(Debug, Clone, Copy)]
enum Trigger {
    FileChange,
    Sighup,
}

impl Trigger {
    fn as_str(self) -> &'static str {
        match self {
            Trigger::FileChange => "file change",
            Trigger::Sighup => "SIGHUP",
        }
    }
}

/// The certificate pair being served and the content it was loaded from.
struct CertificateSource {
    files: CertificateFiles,
    store: Arc<CertificateStore>,
    /// Digest of the file contents last tried, so that an unchanged pair is not reloaded and a
    /// broken one is reported once per change.
    last_digest: Option<u64>,
}

/// The users file and what a reload must apply besides the file itself.
struct UsersSource {
    path: PathBuf,
    config: Arc<Config>,
    data_dir: PathBuf,
    users: Arc<Users>,
    last_digest: Option<u64>,
}

/// Starts watching the files and listening for SIGHUP. The task runs until the process exits.
pub fn spawn(
    config: Arc<Config>,
    data_dir: PathBuf,
    certificate_files: CertificateFiles,
    certificate_store: Arc<CertificateStore>,
    users: Arc<Users>,
) -> tokio::task::JoinHandle<()> {
    let mut certificate = CertificateSource {
        last_digest: digest(&[&certificate_files.cert, &certificate_files.key]),
        files: certificate_files,
        store: certificate_store,
    };
    let mut users = config.auth.users_file.clone().map(|path| UsersSource {
        last_digest: digest(&[&path]),
        path,
        config: config.clone(),
        data_dir,
        users,
    });

    let mut watched: Vec<&Path> = vec![&certificate.files.cert, &certificate.files.key];
    if let Some(users) = &users {
        watched.push(&users.path);
    }
    let (events_tx, mut events_rx) = mpsc::channel::<()>(1);
    let watcher = watch(&watched, events_tx);

    // Installed before this function returns: until then, SIGHUP's default action ends the process.
    let mut hangups = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(signal) => Some(signal),
        Err(error) => {
            tracing::error!(%error, "cannot install the SIGHUP handler; reload works on file change only");
            None
        }
    };

    tokio::spawn(async move {
        // Dropping the watcher stops the events, so the task owns it.
        let _watcher = watcher;
        loop {
            let trigger = tokio::select! {
                Some(()) = events_rx.recv() => {
                    settle(&mut events_rx).await;
                    Trigger::FileChange
                }
                Some(()) = recv_hangup(&mut hangups) => Trigger::Sighup,
                else => return,
            };
            let force = matches!(trigger, Trigger::Sighup);
            reload_certificate(&mut certificate, trigger, force);
            if let Some(users) = &mut users {
                reload_users(users, trigger, force);
            }
            if force {
                reopen_xferlog();
            }
        }
    })
}

async fn recv_hangup(hangups: &mut Option<tokio::signal::unix::Signal>) -> Option<()> {
    match hangups {
        Some(signal) => signal.recv().await,
        None => std::future::pending().await,
    }
}

/// Waits until no file event arrived for [`SETTLE_TIME`].
async fn settle(events: &mut mpsc::Receiver<()>) {
    while let Ok(Some(())) = tokio::time::timeout(SETTLE_TIME, events.recv()).await {}
}

/// Watches the parent directory of every file and sends a unit on `events` for each change to
/// one of the files or to Kubernetes' `..data` symlinks. Returns `None`, after logging why, when
/// no watch could be set up; SIGHUP still reloads then.
fn watch(files: &[&Path], events: mpsc::Sender<()>) -> Option<notify::RecommendedWatcher> {
    let directories: BTreeSet<PathBuf> = files.iter().map(|file| parent_dir(file)).collect();
    let names: BTreeSet<OsString> = files.iter().filter_map(|file| file.file_name().map(OsString::from)).collect();

    let handler = move |result: notify::Result<notify::Event>| {
        let Ok(event) = result else {
            return;
        };
        let relevant = event.paths.iter().any(|path| {
            path.file_name()
                .is_some_and(|name| names.contains(name) || name.to_string_lossy().starts_with(".."))
        });
        if relevant {
            // A full channel already contains a pending reload, which this change joins.
            let _ = events.try_send(());
        }
    };
    let mut watcher = match notify::recommended_watcher(handler) {
        Ok(watcher) => watcher,
        Err(error) => {
            tracing::error!(%error, "cannot watch the certificate and users files; reload them with SIGHUP");
            return None;
        }
    };
    for directory in &directories {
        if let Err(error) = watcher.watch(directory, RecursiveMode::NonRecursive) {
            tracing::error!(directory = %directory.display(), %error, "cannot watch the directory; reload its files with SIGHUP");
        }
    }
    Some(watcher)
}

fn parent_dir(file: &Path) -> PathBuf {
    match file.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Hashes the contents of the files; `None` when one cannot be read, which the load then reports.
fn digest(files: &[&Path]) -> Option<u64> {
    let mut hasher = DefaultHasher::new();
    for file in files {
        std::fs::read(file).ok()?.hash(&mut hasher);
    }
    Some(hasher.finish())
}

fn reload_certificate(source: &mut CertificateSource, trigger: Trigger, force: bool) {
    let digest = digest(&[&source.files.cert, &source.files.key]);
    if !force && digest.is_some() && digest == source.last_digest {
        return;
    }
    source.last_digest = digest;

    match tls::load_certificate(&source.files) {
        Ok(loaded) => {
            let (serial, not_after) = (loaded.serial.clone(), loaded.not_after);
            let previous = source.store.replace(loaded);
            metrics::set_certificate_expiry(not_after);
            metrics::RELOADS.with_label_values(&["certificate", "ok"]).inc();
            tracing::info!(
                trigger = trigger.as_str(),
                cert = %source.files.cert.display(),
                serial = %serial,
                previous_serial = %previous.serial,
                not_after = not_after.duration_since(std::time::UNIX_EPOCH).map_or(0, |since| since.as_secs()),
                "certificate reloaded; new TLS sessions use it"
            );
        }
        Err(error) => {
            metrics::RELOADS.with_label_values(&["certificate", "failed"]).inc();
            tracing::error!(
                trigger = trigger.as_str(),
                %error,
                serial = %source.store.current().serial,
                "certificate reload failed; keeping the current certificate"
            );
        }
    }
}

fn reload_users(source: &mut UsersSource, trigger: Trigger, force: bool) {
    let digest = digest(&[&source.path]);
    if !force && digest.is_some() && digest == source.last_digest {
        return;
    }
    source.last_digest = digest;

    match super::load_users(&source.config).and_then(|(db, _)| {
        let problems = super::create_homes(&source.data_dir, &db, source.config.storage.dir_mode.0);
        if problems.is_empty() { Ok(db) } else { Err(problems.join("\n")) }
    }) {
        Ok(db) => {
            let count = db.len();
            source.users.replace(db);
            metrics::RELOADS.with_label_values(&["users", "ok"]).inc();
            tracing::info!(
                trigger = trigger.as_str(),
                users_file = %source.path.display(),
                users = count,
                "users reloaded; open sessions keep the settings they logged in with"
            );
        }
        Err(error) => {
            metrics::RELOADS.with_label_values(&["users", "failed"]).inc();
            tracing::error!(
                trigger = trigger.as_str(),
                users_file = %source.path.display(),
                // One problem per line in the message; a log line must stay one line.
                error = %error.replace('\n', "; "),
                "users reload failed; keeping the current users"
            );
        }
    }
}

fn reopen_xferlog() {
    match xferlog::reopen() {
        Ok(Some(path)) => tracing::info!(path = %path.display(), "transfer log reopened"),
        Ok(None) => {}
        Err(error) => tracing::error!(%error, "cannot reopen the transfer log; writing on to the file opened before"),
    }
}
