//! Server wiring. [`prepare`] checks every setting that can be wrong before a port is bound;
//! [`run`] builds the libunftp server from the result, serves until the shutdown future ends, then
//! drains the sessions.
//!
//! - [`admin`]: the HTTP listener for `/healthz`, `/readyz` and `/metrics`.
//! - [`reload`]: reloads the certificate and the users file on change and on SIGHUP.

pub mod admin;
pub mod reload;
mod sockets;

use std::{
    future::Future,
    io,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, OnceLock},
    time::{Duration, Instant},
};

use libunftp::{ServerBuilder, options};
use rand::distr::{Alphanumeric, SampleString};

use crate::{
    auth::{FtpUser, GENERATED_USER, UserDb, Users},
    config::{Config, ConfigErrors, PassiveHost, PassiveMode, parse_passive_host},
    metrics,
    storage::{SiteStorage, StorageOptions, remove_stale_uploads},
    telemetry::xferlog::{self, XferlogFile},
    tls::{self, CertificateFiles, CertificateStore, LoadedCertificate},
};

/// Everything [`run`] needs, checked and loaded.
pub struct Prepared {
    pub config: Config,
    /// Canonical absolute data directory.
    pub data_dir: PathBuf,
    pub users: Arc<Users>,
    /// Password of the user created because none was configured; logged once by [`run`].
    pub generated_password: Option<String>,
    pub certificate_files: CertificateFiles,
    pub certificate: LoadedCertificate,
    pub certificate_store: Arc<CertificateStore>,
    pub passive_host: PassiveHost,
    /// The transfer log, opened for appending, when `log.xferlog_file` is set.
    pub xferlog: Option<XferlogFile>,
}

/// Checks the data directory, users and TLS material; returns one message per problem.
pub fn prepare(config: Config) -> Result<Prepared, ConfigErrors> {
    let mut problems = Vec::new();

    let data_dir = match prepare_data_dir(&config.storage.data_dir, config.storage.dir_mode.0) {
        Ok(path) => Some(path),
        Err(problem) => {
            problems.push(problem);
            None
        }
    };

    let (db, generated_password) = match load_users(&config) {
        Ok(loaded) => loaded,
        Err(problem) => {
            problems.push(problem);
            (UserDb::default(), None)
        }
    };
    if let Some(data_dir) = &data_dir {
        problems.extend(create_homes(data_dir, &db, config.storage.dir_mode.0));
    }

    let xferlog = match &config.log.xferlog_file {
        Some(path) => match xferlog::open(path) {
            Ok(file) => Some(file),
            Err(error) => {
                problems.push(format!(
                    "log.xferlog_file = {} cannot be opened for appending: {error}: point it at a writable file, or remove the key",
                    path.display()
                ));
                None
            }
        },
        None => None,
    };

    // validate() already accepted the value; parse it again for its typed form.
    let passive_host = parse_passive_host(&config.passive.host).unwrap_or(PassiveHost::FromConnection);

    let tls_material = tls::certificate_files(&config.tls, &passive_host)
        .and_then(|files| tls::load_certificate(&files).map(|certificate| (files, certificate)));
    let (certificate_files, certificate) = match tls_material {
        Ok(material) => material,
        Err(error) => {
            problems.push(error.to_string());
            return Err(ConfigErrors(problems));
        }
    };

    if !problems.is_empty() {
        return Err(ConfigErrors(problems));
    }
    // Both are Some when problems is empty.
    let data_dir = data_dir.expect("data directory checked");
    let certificate_store = Arc::new(CertificateStore::new(certificate.clone()));
    Ok(Prepared {
        users: Arc::new(Users::new(db, data_dir.clone())),
        data_dir,
        generated_password,
        certificate_files,
        certificate,
        certificate_store,
        passive_host,
        xferlog,
        config,
    })
}

/// Creates the users' home directories under the data directory; returns one message per failure.
fn create_homes(data_dir: &Path, db: &UserDb, dir_mode: u32) -> Vec<String> {
    db.homes()
        .into_iter()
        .filter_map(|home| {
            create_dir_with_mode(&data_dir.join(&home), dir_mode)
                .err()
                .map(|error| format!("cannot create home directory {} under storage.data_dir: {error}", home.display()))
        })
        .collect()
}

/// Creates the data directory when missing, and proves it writable with a probe file.
fn prepare_data_dir(path: &Path, dir_mode: u32) -> Result<PathBuf, String> {
    let shown = path.display();
    if !path.exists() {
        create_dir_with_mode(path, dir_mode)
            .map_err(|error| format!("storage.data_dir = {shown} does not exist and cannot be created: {error}"))?;
    }
    if !path.is_dir() {
        return Err(format!(
            "storage.data_dir = {shown} is not a directory: point it at the volume's mount path"
        ));
    }
    let canonical = path
        .canonicalize()
        .map_err(|error| format!("storage.data_dir = {shown} cannot be resolved: {error}"))?;

    probe_writable(&canonical).map_err(|error| {
        format!("storage.data_dir = {shown} is not writable: {error}: give the server's user write access (on Kubernetes, set the pod's fsGroup)")
    })?;
    Ok(canonical)
}

/// Proves a directory writable by creating and removing an empty probe file in it.
fn probe_writable(dir: &Path) -> io::Result<()> {
    let probe = dir.join(format!(".ftpsd-write-probe-{}", std::process::id()));
    std::fs::write(&probe, b"")?;
    // The probe proved writability; a failed removal leaves an empty file and changes nothing.
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

fn create_dir_with_mode(path: &Path, mode: u32) -> io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    if path.is_dir() {
        return Ok(());
    }
    std::fs::DirBuilder::new().recursive(true).mode(mode).create(path)?;
    // set_dir_mode keeps the setgid bit that a shared volume's directories pass down.
    crate::storage::set_dir_mode(path, mode)
}

/// Loads the users file, or creates a single user with a random password when no user and no
/// anonymous access are configured, so that the first run on defaults is usable.
fn load_users(config: &Config) -> Result<(UserDb, Option<String>), String> {
    let mut db = match &config.auth.users_file {
        Some(path) => UserDb::from_file(path)?,
        None => UserDb::default(),
    };
    if config.auth.anonymous {
        db.allow_anonymous(config.auth.anonymous_home.clone())?;
    }
    if !db.is_empty() {
        return Ok((db, None));
    }
    if let Some(path) = &config.auth.users_file {
        return Err(format!(
            "users file {} has no [[users]] entry and auth.anonymous is off: add a user (see `ftpsd hash-password`)",
            path.display()
        ));
    }
    let password = Alphanumeric.sample_string(&mut rand::rng(), 20);
    Ok((UserDb::with_single_user(GENERATED_USER, &password), Some(password)))
}

/// Serves until `shutdown` completes, then drains: readiness turns false, new logins get 421,
/// and transfers in flight get `server.drain_timeout_secs` to finish before the remaining
/// sessions are closed. Returns `Ok` after a drain, whether or not the deadline cut it short.
pub async fn run<F>(prepared: Prepared, shutdown: F) -> anyhow::Result<()>
where
    F: Future<Output = ()> + Send + Sync + 'static,
{
    let Prepared {
        config,
        data_dir,
        users,
        generated_password,
        certificate_files,
        certificate,
        certificate_store,
        passive_host,
        xferlog,
    } = prepared;
    let config = Arc::new(config);

    let removed = remove_stale_uploads(&data_dir);
    if removed > 0 {
        tracing::info!(removed, data_dir = %data_dir.display(), "removed temporary files of interrupted uploads");
    }

    // libunftp binds inside listen() and reports a busy port only as "io error", after the start
    // line. A trial bind here names the address and the fix. Another process can still take the
    // port between the two binds, which libunftp then reports.
    if let Err(error) = std::net::TcpListener::bind(config.listen_address()) {
        anyhow::bail!(
            "cannot listen on server.listen = {}: {error}: stop the process that uses the port, or choose another one with --listen",
            config.server.listen
        );
    }
    if certificate.not_after < std::time::SystemTime::now() {
        tracing::warn!(cert = %certificate_files.cert.display(), serial = %certificate.serial, "the TLS certificate has expired: clients that verify it will refuse to connect");
    }

    metrics::init(config.passive_ports().len(), certificate.not_after);
    if let Some(file) = xferlog {
        xferlog::install(file);
    }

    let readiness = Arc::new(admin::Readiness::new(
        config.listen_address().port(),
        data_dir.clone(),
        certificate_store.clone(),
    ));
    if !config.admin.listen.is_empty() {
        start_admin(&config, readiness.clone()).await?;
    }

    reload::spawn(
        config.clone(),
        data_dir.clone(),
        certificate_files.clone(),
        certificate_store.clone(),
        users.clone(),
    );

    let drain = Arc::new(OnceLock::new());
    let server = build_server(
        &config,
        &data_dir,
        &users,
        &passive_host,
        certificate_store,
        Drain {
            shutdown,
            readiness: readiness.clone(),
            started: drain.clone(),
        },
    )?;

    tracing::info!(
        listen = %config.server.listen,
        passive_ports = %config.passive.ports,
        passive_host = %config.passive.host,
        data_dir = %data_dir.display(),
        cert = %certificate_files.cert.display(),
        cert_serial = %certificate.serial,
        tls_required = config.tls.require,
        users = users.current().len(),
        admin_listen = %config.admin.listen,
        version = env!("CARGO_PKG_VERSION"),
        "ftpsd started"
    );
    if let Some(password) = generated_password {
        // The one place a password is logged: the issue-free first run needs a way in.
        tracing::warn!(
            user = GENERATED_USER,
            password = %password,
            "no users configured: created a user with a random password for this run only; set auth.users_file for real users"
        );
    }

    readiness.mark_listener_started();
    let result = server.listen(config.server.listen.clone()).await;
    finish(result, drain.get().copied())
}

/// Binds `admin.listen` and serves the admin endpoints, before the FTP port is bound, so that a
/// taken admin port stops the start.
async fn start_admin(config: &Config, readiness: Arc<admin::Readiness>) -> anyhow::Result<()> {
    // validate() accepted the address.
    let address: SocketAddr = config.admin.listen.parse().expect("admin.listen was validated");
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .map_err(|error| anyhow::anyhow!("cannot bind admin.listen = {address}: {error}: choose a free port"))?;
    admin::spawn(
        listener,
        readiness,
        config.passive_ports(),
        config.passive.mode == PassiveMode::Pooled,
    );
    Ok(())
}

/// The inputs of the shutdown indicator: the signal future, the readiness to turn off, and the
/// slot that records when the drain started.
struct Drain<F> {
    shutdown: F,
    readiness: Arc<admin::Readiness>,
    started: Arc<OnceLock<DrainStart>>,
}

/// When the drain started, with the sessions open and the transfers finished at that moment.
#[derive(Debug, Clone, Copy)]
struct DrainStart {
    at: Instant,
    sessions: i64,
    transfers_finished: u64,
}

/// Builds the libunftp server. Its shutdown indicator turns readiness off and starts the drain.
fn build_server<F>(
    config: &Config,
    data_dir: &Path,
    users: &Arc<Users>,
    passive_host: &PassiveHost,
    certificate_store: Arc<CertificateStore>,
    drain: Drain<F>,
) -> anyhow::Result<libunftp::Server<SiteStorage, FtpUser>>
where
    F: Future<Output = ()> + Send + Sync + 'static,
{
    let tls_config = tls::server_config(certificate_store)?;
    let storage_options = Arc::new(StorageOptions {
        data_dir: data_dir.to_path_buf(),
        atomic_uploads: config.storage.atomic_uploads,
        file_mode: config.storage.file_mode.0,
        dir_mode: config.storage.dir_mode.0,
        users: Some(users.clone()),
    });
    let drain_timeout = Duration::from_secs(config.server.drain_timeout_secs);
    let required = if config.tls.require {
        options::FtpsRequired::All
    } else {
        options::FtpsRequired::None
    };
    // libunftp keeps the greeting for the whole process life.
    let greeting: &'static str = Box::leak(config.server.greeting.clone().into_boxed_str());

    let mut builder = ServerBuilder::<SiteStorage, FtpUser>::with_user_detail_provider(
        Box::new(move || {
            // libunftp calls this factory once per accepted control connection.
            metrics::SESSIONS.inc();
            SiteStorage::new(storage_options.clone())
        }),
        users.clone(),
    )
    .authenticator(users.clone())
    .greeting(greeting)
    .logger(crate::telemetry::libunftp_logger())
    .ftps_manual::<PathBuf>(tls_config)
    .ftps_required(required, required)
    .passive_ports(config.passive_ports())
    .passive_host(match passive_host {
        PassiveHost::FromConnection => options::PassiveHost::FromConnection,
        PassiveHost::Ip(ip) => options::PassiveHost::Ip(*ip),
        PassiveHost::Dns(name) => options::PassiveHost::Dns(name.clone()),
    })
    .idle_session_timeout(config.server.idle_timeout_secs)
    .metrics()
    .shutdown_indicator(async move {
        drain.shutdown.await;
        drain.readiness.start_draining();
        metrics::DRAINING.set(1);
        let start = DrainStart {
            at: Instant::now(),
            sessions: metrics::SESSIONS_ACTIVE.get(),
            transfers_finished: metrics::transfers_finished(),
        };
        let _ = drain.started.set(start);
        tracing::info!(
            sessions = start.sessions,
            drain_timeout_secs = drain_timeout.as_secs(),
            "draining: not ready, new logins get 421, transfers in flight may finish"
        );
        options::Shutdown::new().grace_period(drain_timeout)
    });
    if config.passive.mode == PassiveMode::Pooled {
        builder = builder.pooled_listener_mode();
    }
    if config.auth.max_failed_logins > 0 {
        builder = builder.failed_logins_policy(options::FailedLoginsPolicy::new(
            config.auth.max_failed_logins,
            Duration::from_secs(config.auth.lockout_secs),
            options::FailedLoginsBlock::UserAndIP,
        ));
    }
    Ok(builder.build()?)
}

/// Logs how the server stopped. libunftp returns an error when the drain deadline passes with
/// sessions still open. That is a planned stop too, so this returns `Ok` and the process exits 0.
fn finish(result: Result<(), libunftp::ServerError>, drain: Option<DrainStart>) -> anyhow::Result<()> {
    let Some(drain) = drain else {
        return match result {
            Ok(()) => {
                tracing::info!("ftpsd stopped");
                Ok(())
            }
            Err(error) => Err(anyhow::anyhow!("server stopped with an error: {error}")),
        };
    };

    let transfers_finished = metrics::transfers_finished().saturating_sub(drain.transfers_finished);
    let duration_ms = drain.at.elapsed().as_millis() as u64;
    match result {
        Ok(()) => tracing::info!(
            sessions_drained = drain.sessions,
            transfers_finished,
            duration_ms,
            "ftpsd stopped: every session ended before the drain deadline"
        ),
        Err(error) => tracing::warn!(
            sessions_drained = drain.sessions,
            transfers_finished,
            sessions_closed = metrics::SESSIONS_ACTIVE.get(),
            duration_ms,
            %error,
            "ftpsd stopped: the drain deadline passed; closing the remaining sessions"
        ),
    }
    Ok(())
}
