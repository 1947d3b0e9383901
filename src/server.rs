//! Server wiring. [`prepare`] checks every setting that can be wrong before a port is bound;
//! [`run`] builds the libunftp server from the result and serves until the shutdown future ends.

use std::{
    future::Future,
    io,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use libunftp::{ServerBuilder, options};
use rand::distr::{Alphanumeric, SampleString};

use crate::{
    auth::{FtpUser, GENERATED_USER, UserDb, Users},
    config::{Config, ConfigErrors, PassiveHost, PassiveMode, parse_passive_host},
    storage::{SiteStorage, StorageOptions, remove_stale_uploads},
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
        for home in db.homes() {
            if let Err(error) = create_dir_with_mode(&data_dir.join(&home), config.storage.dir_mode.0) {
                problems.push(format!(
                    "cannot create home directory {} under storage.data_dir: {error}",
                    home.display()
                ));
            }
        }
    }

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
    let certificate_store = Arc::new(CertificateStore::new(certificate.key.clone()));
    Ok(Prepared {
        users: Arc::new(Users::new(db, data_dir.clone())),
        data_dir,
        generated_password,
        certificate_files,
        certificate,
        certificate_store,
        passive_host,
        config,
    })
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

    let probe = canonical.join(format!(".ftpsd-write-probe-{}", std::process::id()));
    std::fs::write(&probe, b"").map_err(|error| {
        format!("storage.data_dir = {shown} is not writable: {error}: give the server's user write access (on Kubernetes, set the pod's fsGroup)")
    })?;
    // The probe proved writability; a failed removal leaves an empty file and changes nothing.
    let _ = std::fs::remove_file(&probe);
    Ok(canonical)
}

fn create_dir_with_mode(path: &Path, mode: u32) -> io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    if path.is_dir() {
        return Ok(());
    }
    std::fs::DirBuilder::new().recursive(true).mode(mode).create(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
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

/// Serves until `shutdown` completes, then gives open sessions `server.drain_timeout_secs` to end.
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
    } = prepared;

    let removed = remove_stale_uploads(&data_dir);
    if removed > 0 {
        tracing::info!(removed, data_dir = %data_dir.display(), "removed temporary files of interrupted uploads");
    }

    let tls_config = tls::server_config(certificate_store)?;
    let storage_options = Arc::new(StorageOptions {
        data_dir: data_dir.clone(),
        atomic_uploads: config.storage.atomic_uploads,
        file_mode: config.storage.file_mode.0,
        dir_mode: config.storage.dir_mode.0,
    });
    let drain = Duration::from_secs(config.server.drain_timeout_secs);
    let required = if config.tls.require {
        options::FtpsRequired::All
    } else {
        options::FtpsRequired::None
    };
    // libunftp keeps the greeting for the whole process life.
    let greeting: &'static str = Box::leak(config.server.greeting.clone().into_boxed_str());

    let mut builder = ServerBuilder::<SiteStorage, FtpUser>::with_user_detail_provider(
        Box::new(move || SiteStorage::new(storage_options.clone())),
        users.clone(),
    )
    .authenticator(users.clone())
    .greeting(greeting)
    .logger(crate::telemetry::libunftp_logger())
    .ftps_manual::<PathBuf>(tls_config)
    .ftps_required(required, required)
    .passive_ports(config.passive_ports())
    .passive_host(match &passive_host {
        PassiveHost::FromConnection => options::PassiveHost::FromConnection,
        PassiveHost::Ip(ip) => options::PassiveHost::Ip(*ip),
        PassiveHost::Dns(name) => options::PassiveHost::Dns(name.clone()),
    })
    .idle_session_timeout(config.server.idle_timeout_secs)
    .metrics()
    .shutdown_indicator(async move {
        shutdown.await;
        options::Shutdown::new().grace_period(drain)
    });
    if config.passive.mode == PassiveMode::Pooled {
        builder = builder.pooled_listener_mode();
    }
    let server = builder.build()?;

    tracing::info!(
        listen = %config.server.listen,
        passive_ports = %config.passive.ports,
        passive_host = %config.passive.host,
        data_dir = %data_dir.display(),
        cert = %certificate_files.cert.display(),
        cert_serial = %certificate.serial,
        tls_required = config.tls.require,
        users = users.current().len(),
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

    let result = server.listen(config.server.listen.clone()).await;
    match result {
        Ok(()) => {
            tracing::info!("ftpsd stopped");
            Ok(())
        }
        Err(error) => Err(anyhow::anyhow!("server stopped with an error: {error}")),
    }
}
