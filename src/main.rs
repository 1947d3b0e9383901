//! The `ftpsd` command: parses flags, loads the configuration and runs the server or a helper
//! subcommand. Everything else lives in the library crate.

use std::{io::Read, path::PathBuf, process::ExitCode, time::Duration};

use clap::{Args, Parser, Subcommand};
use ftpsd::config::{Config, ENV_CONFIG_FILE, LogFormat, Overrides};
use tokio::signal::unix::{SignalKind, signal};

/// An FTPS server for Kubernetes volumes.
///
/// Settings come from built-in defaults, then the TOML file given by --config, then FTPSD_*
/// environment variables (FTPSD_SECTION__KEY, such as FTPSD_PASSIVE__PORTS=30000-30019), then
/// these flags. See docs/configuration.md for every key.
#[derive(Debug, Parser)]
#[command(name = "ftpsd", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,

    #[command(flatten)]
    settings: Settings,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the server (the default when no subcommand is given).
    Serve,
    /// Read a password from standard input and print its argon2id hash for the users file.
    HashPassword,
    /// Print the effective configuration, with nothing secret in it, and exit non-zero on any problem.
    CheckConfig,
}

#[derive(Debug, Args)]
struct Settings {
    /// TOML configuration file.
    #[arg(long, global = true, env = ENV_CONFIG_FILE, value_name = "FILE")]
    config: Option<PathBuf>,

    /// Control connection address and port [default: 0.0.0.0:2121].
    #[arg(long, global = true, value_name = "ADDR:PORT")]
    listen: Option<String>,

    /// Passive data port range, inclusive [default: 50000-50019].
    #[arg(long, global = true, value_name = "START-END")]
    passive_ports: Option<String>,

    /// Address advertised in PASV replies: from-connection, an IPv4 address, or a DNS name
    /// resolved per session [default: from-connection].
    #[arg(long, global = true, value_name = "HOST")]
    passive_host: Option<String>,

    /// Passive listener mode: per-session or pooled [default: per-session].
    #[arg(long, global = true, value_name = "MODE")]
    passive_mode: Option<String>,

    /// PEM certificate chain; needs --key-file. Without both, a self-signed pair is generated
    /// in tls.generated_dir [default: certs] and reused.
    #[arg(long, global = true, value_name = "FILE")]
    cert_file: Option<PathBuf>,

    /// PEM private key of --cert-file.
    #[arg(long, global = true, value_name = "FILE")]
    key_file: Option<PathBuf>,

    /// Directory served to clients, created when missing [default: data].
    #[arg(long, global = true, value_name = "DIR")]
    data_dir: Option<PathBuf>,

    /// TOML users file with [[users]] entries (name, password_hash, home, read_only).
    #[arg(long, global = true, value_name = "FILE")]
    users_file: Option<PathBuf>,

    /// Log format [default: text].
    #[arg(long, global = true, value_enum)]
    log_format: Option<LogFormat>,

    /// Log filter such as info or ftpsd=debug [default: info]; RUST_LOG overrides it.
    #[arg(long, global = true, value_name = "FILTER")]
    log_level: Option<String>,

    /// Admin HTTP address for /healthz, /readyz and /metrics; empty turns it off [default: off].
    #[arg(long, global = true, value_name = "ADDR:PORT")]
    admin_listen: Option<String>,
}

impl Settings {
    fn overrides(&self) -> Overrides {
        Overrides {
            listen: self.listen.clone(),
            passive_ports: self.passive_ports.clone(),
            passive_host: self.passive_host.clone(),
            passive_mode: self.passive_mode.clone(),
            cert_file: self.cert_file.clone(),
            key_file: self.key_file.clone(),
            data_dir: self.data_dir.clone(),
            users_file: self.users_file.clone(),
            log_format: self.log_format,
            log_level: self.log_level.clone(),
            admin_listen: self.admin_listen.clone(),
        }
    }

    fn load(&self) -> Result<Config, ftpsd::config::ConfigErrors> {
        Config::load(self.config.as_deref(), std::env::vars(), &self.overrides())
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Serve) {
        Command::HashPassword => hash_password(),
        Command::CheckConfig => check_config(&cli.settings),
        Command::Serve => serve(&cli.settings),
    }
}

fn hash_password() -> ExitCode {
    let mut input = String::new();
    if let Err(error) = std::io::stdin().read_to_string(&mut input) {
        eprintln!("error: cannot read the password from standard input: {error}");
        return ExitCode::FAILURE;
    }
    let password = input
        .strip_suffix('\n')
        .map(|line| line.strip_suffix('\r').unwrap_or(line))
        .unwrap_or(&input);
    if password.is_empty() {
        eprintln!("error: the password on standard input is empty: pipe one in, as in: printf '%s' 'secret' | ftpsd hash-password");
        return ExitCode::FAILURE;
    }
    println!("{}", ftpsd::auth::hash_password(password));
    ExitCode::SUCCESS
}

fn check_config(settings: &Settings) -> ExitCode {
    let config = match settings.load() {
        Ok(config) => config,
        Err(errors) => {
            eprintln!("{errors}");
            return ExitCode::from(2);
        }
    };
    ftpsd::telemetry::init(&config.log);
    match ftpsd::server::prepare(config) {
        Ok(prepared) => {
            // The configuration contains paths and settings only. Passwords live in the users file.
            match toml::to_string(&prepared.config) {
                Ok(text) => print!("{text}"),
                Err(error) => eprintln!("error: cannot print the configuration: {error}"),
            }
            println!("# users: {}", prepared.users.current().len());
            println!(
                "# certificate: {} (serial {})",
                prepared.certificate_files.cert.display(),
                prepared.certificate.serial
            );
            ExitCode::SUCCESS
        }
        Err(errors) => {
            eprintln!("{errors}");
            ExitCode::from(2)
        }
    }
}

fn serve(settings: &Settings) -> ExitCode {
    let config = match settings.load() {
        Ok(config) => config,
        Err(errors) => {
            eprintln!("{errors}");
            return ExitCode::from(2);
        }
    };
    ftpsd::telemetry::init(&config.log);

    let prepared = match ftpsd::server::prepare(config) {
        Ok(prepared) => prepared,
        Err(errors) => {
            eprintln!("{errors}");
            return ExitCode::from(2);
        }
    };

    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(ftpsd::server::run(prepared, shutdown_signal()));
    // Sessions still open after the drain deadline are cut here. Blocking tasks (an fsync, an
    // argon2 hash) cannot be cancelled, so the exit waits for them for a moment only.
    runtime.shutdown_timeout(Duration::from_secs(2));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(%error, "ftpsd failed");
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Completes on the first SIGTERM or SIGINT, which starts the drain. A second one during the
/// drain ends the process at once, with the shell's status for death by that signal (128 + its
/// number), because transfers in flight are cut.
async fn shutdown_signal() {
    let (Ok(mut terminate), Ok(mut interrupt)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        tracing::error!("cannot install signal handlers; stop the server with SIGKILL");
        return std::future::pending().await;
    };
    let first = tokio::select! {
        _ = terminate.recv() => "SIGTERM",
        _ = interrupt.recv() => "SIGINT",
    };
    tracing::info!(signal = first, "shutting down; send the signal again to exit at once");

    tokio::spawn(async move {
        let (name, kind) = tokio::select! {
            _ = terminate.recv() => ("SIGTERM", SignalKind::terminate()),
            _ = interrupt.recv() => ("SIGINT", SignalKind::interrupt()),
        };
        tracing::warn!(signal = name, "second signal: exiting at once, cutting the transfers in flight");
        std::process::exit(128 + kind.as_raw_value());
    });
}
