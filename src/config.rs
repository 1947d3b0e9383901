//! Typed configuration: defaults, then a TOML file, then `FTPSD_` environment variables, then
//! command-line flags, merged by the `config` crate and checked once before anything is bound.

use std::{
    fmt,
    net::{IpAddr, SocketAddr},
    ops::RangeInclusive,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Prefix of the environment variables that set configuration keys, as in
/// `FTPSD_PASSIVE__PORTS=30000-30019` for `passive.ports`.
pub const ENV_PREFIX: &str = "FTPSD";

/// Environment variable that names the configuration file; it is not a configuration key itself.
pub const ENV_CONFIG_FILE: &str = "FTPSD_CONFIG";

/// The whole server configuration.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub passive: PassiveConfig,
    pub tls: TlsConfig,
    pub storage: StorageConfig,
    pub auth: AuthConfig,
    pub log: LogConfig,
    pub admin: AdminConfig,
}

/// The control connection listener.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Address and port of the control connection listener.
    pub listen: String,
    /// Text of the 220 reply sent to every new connection.
    pub greeting: String,
    /// Seconds a logged-in session may stay silent before the server closes it.
    pub idle_timeout_secs: u64,
    /// Seconds that in-flight transfers get to finish after SIGTERM or SIGINT. Keep it below the
    /// pod's `terminationGracePeriodSeconds` (30 by default), which ends in SIGKILL.
    pub drain_timeout_secs: u64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: "0.0.0.0:2121".to_string(),
            greeting: "ftpsd ready".to_string(),
            idle_timeout_secs: 600,
            drain_timeout_secs: 25,
        }
    }
}

/// Passive data port range, advertised address and listener mode.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PassiveConfig {
    /// Inclusive port range, written `START-END`.
    pub ports: String,
    /// Address advertised in PASV replies: `from-connection`, an IPv4 address or a DNS name.
    pub host: String,
    /// `per-session` binds a port for each PASV; `pooled` binds the whole range at start.
    pub mode: PassiveMode,
}

impl Default for PassiveConfig {
    fn default() -> Self {
        PassiveConfig {
            ports: "50000-50019".to_string(),
            host: "from-connection".to_string(),
            mode: PassiveMode::PerSession,
        }
    }
}

/// Passive listener binding strategy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PassiveMode {
    PerSession,
    Pooled,
}

/// Certificate source and TLS policy.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain, leaf first.
    pub cert_file: Option<PathBuf>,
    /// PEM private key matching `cert_file`.
    pub key_file: Option<PathBuf>,
    /// Directory where a self-signed pair is generated on first start and reused afterwards.
    pub generated_dir: PathBuf,
    /// Require TLS on the control and the data channel.
    pub require: bool,
}

impl Default for TlsConfig {
    fn default() -> Self {
        TlsConfig {
            cert_file: None,
            key_file: None,
            generated_dir: PathBuf::from("certs"),
            require: true,
        }
    }
}

/// The volume that clients read and write.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageConfig {
    /// Root of everything clients can reach.
    pub data_dir: PathBuf,
    /// Write uploads to a hidden temporary file and rename it over the target when complete.
    pub atomic_uploads: bool,
    /// Permission bits of files that ftpsd creates, applied whatever the process umask.
    pub file_mode: Mode,
    /// Permission bits of directories that ftpsd creates.
    pub dir_mode: Mode,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            data_dir: PathBuf::from("data"),
            atomic_uploads: true,
            file_mode: Mode(0o644),
            dir_mode: Mode(0o755),
        }
    }
}

/// Users and anonymous access.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// TOML file with `[[users]]` entries; see `crate::auth`. Reloaded on change and on SIGHUP.
    pub users_file: Option<PathBuf>,
    /// Accept `anonymous` and `ftp` with any password, read-only.
    pub anonymous: bool,
    /// Subdirectory of `storage.data_dir` that anonymous users see as their root.
    pub anonymous_home: Option<PathBuf>,
    /// Consecutive failed logins of one user from one address before that pair is locked out;
    /// 0 turns the lockout off.
    pub max_failed_logins: u32,
    /// Seconds after the last failed login that a lockout lasts.
    pub lockout_secs: u64,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            users_file: None,
            anonymous: false,
            anonymous_home: None,
            // Off by default: behind a Kubernetes Service without externalTrafficPolicy: Local,
            // every client comes from a node address, and a lockout by user and address would
            // lock out the real user together with the attacker.
            max_failed_logins: 0,
            lockout_secs: 300,
        }
    }
}

/// Log output.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A `tracing` filter directive such as `info` or `ftpsd=debug,libunftp=warn`.
    pub level: String,
    /// File that gets one line per transfer in the xferlog format of wu-ftpd, vsftpd and ProFTPD;
    /// unset turns it off. The file is reopened on SIGHUP, for log rotation.
    pub xferlog_file: Option<PathBuf>,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Text,
            level: "info".to_string(),
            xferlog_file: None,
        }
    }
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One human-readable line per event.
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// The admin HTTP listener for health probes and metrics.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    /// Address of the admin listener; empty turns it off.
    pub listen: String,
}

/// Unix permission bits. Strings are read as octal (`"0644"`, `"644"`); TOML integers such as
/// `0o644` are taken as they are.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Mode(pub u32);

impl fmt::Debug for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04o}", self.0)
    }
}

impl Serialize for Mode {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&format!("{:04o}", self.0))
    }
}

impl<'de> Deserialize<'de> for Mode {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u32),
            Text(String),
        }
        let bits = match Raw::deserialize(deserializer)? {
            Raw::Int(bits) => bits,
            Raw::Text(text) => u32::from_str_radix(text.trim().trim_start_matches("0o"), 8)
                .map_err(|_| serde::de::Error::custom(format!("invalid mode {text:?}: expected octal digits such as \"0644\"")))?,
        };
        if bits > 0o7777 {
            return Err(serde::de::Error::custom(format!(
                "invalid mode {bits:o}: permission bits go up to 7777"
            )));
        }
        Ok(Mode(bits))
    }
}

/// Values given on the command line; each one set overrides the file and the environment.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub listen: Option<String>,
    pub passive_ports: Option<String>,
    pub passive_host: Option<String>,
    pub passive_mode: Option<String>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    pub data_dir: Option<PathBuf>,
    pub users_file: Option<PathBuf>,
    pub log_format: Option<LogFormat>,
    pub log_level: Option<String>,
    pub admin_listen: Option<String>,
}

/// A configuration that failed to load or to validate: one entry per problem.
#[derive(Debug)]
pub struct ConfigErrors(pub Vec<String>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (index, problem) in self.0.iter().enumerate() {
            if index > 0 {
                writeln!(f)?;
            }
            write!(f, "configuration error: {problem}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

impl Config {
    /// Loads the layers in order (defaults, file, environment, flags) and validates the result.
    pub fn load(
        file: Option<&Path>,
        environment: impl IntoIterator<Item = (String, String)>,
        overrides: &Overrides,
    ) -> Result<Config, ConfigErrors> {
        let mut builder = config::Config::builder();

        if let Some(path) = file {
            if !path.is_file() {
                return Err(ConfigErrors(vec![format!(
                    "configuration file {} not found: check --config or {ENV_CONFIG_FILE}",
                    path.display()
                )]));
            }
            builder = builder.add_source(config::File::from(path).format(config::FileFormat::Toml));
        }

        builder = builder.add_source(
            config::Environment::with_prefix(ENV_PREFIX)
                .prefix_separator("_")
                .separator("__")
                .source(Some(environment_keys(environment))),
        );
        builder = apply_overrides(builder, overrides).map_err(|error| ConfigErrors(vec![error.to_string()]))?;

        let merged = builder
            .build()
            .map_err(|error| ConfigErrors(vec![describe_load_error(&error, file)]))?;
        let config: Config = merged
            .try_deserialize()
            .map_err(|error| ConfigErrors(vec![describe_load_error(&error, file)]))?;

        let problems = config.validate();
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigErrors(problems))
        }
    }

    /// Checks every value that can be checked without binding a port; returns one message per problem.
    pub fn validate(&self) -> Vec<String> {
        let mut problems = Vec::new();

        let control = match self.server.listen.parse::<SocketAddr>() {
            Ok(address) => Some(address),
            Err(_) => {
                problems.push(format!(
                    "server.listen = {:?} is not an IP address and port: use a value such as \"0.0.0.0:2121\"",
                    self.server.listen
                ));
                None
            }
        };

        match parse_port_range(&self.passive.ports) {
            Ok(range) => {
                if let Some(control) = control
                    && range.contains(&control.port())
                {
                    problems.push(format!(
                        "passive.ports = {:?} contains the control port {} of server.listen: move one of them",
                        self.passive.ports,
                        control.port()
                    ));
                }
            }
            Err(problem) => problems.push(problem),
        }

        if let Err(problem) = parse_passive_host(&self.passive.host) {
            problems.push(problem);
        }

        // NOTE: libunftp 0.24.0's pooled mode releases a reservation by client address and port
        // alone, so two sessions from one address (clients behind the same NAT) can swap data
        // connections and one receives the other's file. Until that is patched, it stays off.
        if self.passive.mode == PassiveMode::Pooled {
            problems.push(
                "passive.mode = \"pooled\" is disabled: in this libunftp release it can hand one session's data connection to another session from the same client address; use \"per-session\"".to_string(),
            );
        }

        for (key, mode, allowed) in [
            ("storage.file_mode", self.storage.file_mode, 0o777),
            ("storage.dir_mode", self.storage.dir_mode, 0o2777),
        ] {
            if mode.0 & !allowed != 0 {
                problems.push(format!(
                    "{key} = {:04o} sets setuid, sticky or (on files) setgid bits: use permission bits such as \"0644\"; a TOML integer is read as decimal, so write modes as strings",
                    mode.0
                ));
            }
        }

        match (&self.tls.cert_file, &self.tls.key_file) {
            (Some(_), None) => problems
                .push("tls.cert_file is set but tls.key_file is not: set both, or neither to use a generated certificate".to_string()),
            (None, Some(_)) => problems
                .push("tls.key_file is set but tls.cert_file is not: set both, or neither to use a generated certificate".to_string()),
            _ => {}
        }

        if self.server.idle_timeout_secs == 0 {
            problems.push("server.idle_timeout_secs = 0: use a number of seconds greater than 0".to_string());
        }

        if self.auth.max_failed_logins > 0 && self.auth.lockout_secs == 0 {
            problems.push(format!(
                "auth.lockout_secs = 0 with auth.max_failed_logins = {}: use a number of seconds greater than 0, or set auth.max_failed_logins = 0 to turn the lockout off",
                self.auth.max_failed_logins
            ));
        }

        if self.log.xferlog_file.as_ref().is_some_and(|path| path.as_os_str().is_empty()) {
            problems.push("log.xferlog_file is empty: give a file path, or remove the key to turn the transfer log off".to_string());
        }

        if !self.admin.listen.is_empty() {
            match self.admin.listen.parse::<SocketAddr>() {
                Ok(admin) => {
                    if control.is_some_and(|control| control.port() == admin.port()) {
                        problems.push(format!(
                            "admin.listen = {:?} uses the control port: choose another port",
                            self.admin.listen
                        ));
                    }
                    if parse_port_range(&self.passive.ports).is_ok_and(|range| range.contains(&admin.port())) {
                        problems.push(format!(
                            "admin.listen = {:?} uses a passive port: choose a port outside passive.ports",
                            self.admin.listen
                        ));
                    }
                }
                Err(_) => problems.push(format!(
                    "admin.listen = {:?} is not an IP address and port: use a value such as \"0.0.0.0:9090\", or \"\" to turn it off",
                    self.admin.listen
                )),
            }
        }

        for directive in self.log.level.split(',').map(str::trim).filter(|directive| !directive.is_empty()) {
            let level = directive.rsplit_once('=').map_or(directive, |(_, level)| level);
            if !["trace", "debug", "info", "warn", "error", "off"].contains(&level.to_ascii_lowercase().as_str()) {
                problems.push(format!(
                    "log.level = {:?}: {level:?} is not a level: use trace, debug, info, warn, error or off, optionally as TARGET=LEVEL",
                    self.log.level
                ));
            }
        }
        if let Err(error) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            problems.push(format!(
                "log.level = {:?} is not a valid filter ({error}): use a level such as \"info\"",
                self.log.level
            ));
        }

        problems
    }

    /// Returns the control listener address; valid after [`Config::load`].
    pub fn listen_address(&self) -> SocketAddr {
        // validate() rejected anything that does not parse.
        self.server.listen.parse().expect("server.listen was validated")
    }

    /// Returns the passive port range; valid after [`Config::load`].
    pub fn passive_ports(&self) -> RangeInclusive<u16> {
        parse_port_range(&self.passive.ports).expect("passive.ports was validated")
    }
}

/// The advertised passive address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PassiveHost {
    /// The local address of each control connection.
    FromConnection,
    Ip(std::net::Ipv4Addr),
    /// A DNS name, resolved again for every PASV reply.
    Dns(String),
}

/// Parses `passive.host`.
pub fn parse_passive_host(value: &str) -> Result<PassiveHost, String> {
    let value = value.trim();
    if value.is_empty() || value == "from-connection" {
        return Ok(PassiveHost::FromConnection);
    }
    match value.parse::<IpAddr>() {
        Ok(IpAddr::V4(ip)) if ip.is_unspecified() || ip.is_broadcast() || ip.is_multicast() => {
            return Err(format!(
                "passive.host = {value:?} is not an address clients can connect to: use the address of this server or its LoadBalancer, a DNS name or \"from-connection\""
            ));
        }
        Ok(IpAddr::V4(ip)) => return Ok(PassiveHost::Ip(ip)),
        Ok(IpAddr::V6(_)) => {
            return Err(format!(
                "passive.host = {value:?} is an IPv6 address, but PASV replies carry IPv4 only: use an IPv4 address, a DNS name or \"from-connection\""
            ));
        }
        Err(_) => {}
    }
    let valid_name = value.len() <= 253
        && value.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        });
    if valid_name {
        Ok(PassiveHost::Dns(value.to_string()))
    } else {
        Err(format!(
            "passive.host = {value:?} is neither an IPv4 address nor a DNS name: use the address clients connect to, or \"from-connection\""
        ))
    }
}

/// Parses `START-END` into an inclusive range, rejecting empty, reversed and privileged ranges.
pub fn parse_port_range(value: &str) -> Result<RangeInclusive<u16>, String> {
    let invalid = || format!("passive.ports = {value:?} is not a port range: write it as START-END, such as \"50000-50019\"");
    let (start, end) = value.trim().split_once('-').ok_or_else(invalid)?;
    let start: u16 = start.trim().parse().map_err(|_| invalid())?;
    let end: u16 = end.trim().parse().map_err(|_| invalid())?;
    if start == 0 {
        return Err(format!("passive.ports = {value:?} starts at port 0: use ports from 1024 up"));
    }
    if start > end {
        return Err(format!(
            "passive.ports = {value:?} is reversed: write the lower port first, as \"{end}-{start}\""
        ));
    }
    if start < 1024 {
        return Err(format!(
            "passive.ports = {value:?} includes privileged ports below 1024: use ports from 1024 up"
        ));
    }
    Ok(start..=end)
}

/// Keeps the `FTPSD_` variables that name configuration keys, dropping `FTPSD_CONFIG`.
fn environment_keys(environment: impl IntoIterator<Item = (String, String)>) -> config::Map<String, String> {
    environment
        .into_iter()
        .filter(|(name, _)| name.starts_with("FTPSD_") && name != ENV_CONFIG_FILE && !is_service_link(name))
        .collect()
}

/// Recognizes the variables that the kubelet injects for a Service named `ftpsd`
/// (`FTPSD_SERVICE_HOST`, `FTPSD_PORT_21_TCP_ADDR`, ...), which share the `FTPSD_` prefix but are
/// not configuration keys.
fn is_service_link(name: &str) -> bool {
    name == "FTPSD_PORT" || name.starts_with("FTPSD_PORT_") || name.starts_with("FTPSD_SERVICE_")
}

fn apply_overrides(
    mut builder: config::ConfigBuilder<config::builder::DefaultState>,
    overrides: &Overrides,
) -> Result<config::ConfigBuilder<config::builder::DefaultState>, config::ConfigError> {
    let path_text = |path: &PathBuf| path.to_string_lossy().into_owned();
    let pairs: [(&str, Option<String>); 11] = [
        ("server.listen", overrides.listen.clone()),
        ("passive.ports", overrides.passive_ports.clone()),
        ("passive.host", overrides.passive_host.clone()),
        ("passive.mode", overrides.passive_mode.clone()),
        ("tls.cert_file", overrides.cert_file.as_ref().map(path_text)),
        ("tls.key_file", overrides.key_file.as_ref().map(path_text)),
        ("storage.data_dir", overrides.data_dir.as_ref().map(path_text)),
        ("auth.users_file", overrides.users_file.as_ref().map(path_text)),
        (
            "log.format",
            overrides
                .log_format
                .map(|format| if format == LogFormat::Json { "json" } else { "text" }.to_string()),
        ),
        ("log.level", overrides.log_level.clone()),
        ("admin.listen", overrides.admin_listen.clone()),
    ];
    for (key, value) in pairs {
        if let Some(value) = value {
            builder = builder.set_override(key, value)?;
        }
    }
    Ok(builder)
}

/// Rewords a `config` crate error so that it names the source and the offending key.
fn describe_load_error(error: &config::ConfigError, file: Option<&Path>) -> String {
    let source = match file {
        Some(path) => format!("{}, the {ENV_PREFIX}_* environment or a flag", path.display()),
        None => format!("the {ENV_PREFIX}_* environment or a flag"),
    };
    // The config crate appends "in FILE" itself for file errors; the source list below replaces it.
    let mut text = error.to_string();
    if let Some(path) = file {
        text = text.replace(&format!(" in {}", path.display()), "");
    }
    if text.contains("unknown field") {
        format!("{text} (set in {source}): remove the key or fix its spelling (see `ftpsd --help` and docs/configuration.md)")
    } else if text.contains("does not have variant constructor") {
        format!("{text} (set in {source}): passive.mode takes \"per-session\" or \"pooled\", log.format takes \"text\" or \"json\"")
    } else {
        format!("{text} (set in {source}): see docs/configuration.md for the expected type")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn load(toml: Option<&str>, environment: &[(&str, &str)], overrides: &Overrides) -> Result<Config, ConfigErrors> {
        let file = toml.map(|text| {
            let mut file = tempfile::NamedTempFile::new().unwrap();
            file.write_all(text.as_bytes()).unwrap();
            file
        });
        let environment = environment.iter().map(|(name, value)| (name.to_string(), value.to_string()));
        Config::load(file.as_ref().map(|file| file.path()), environment, overrides)
    }

    #[test]
    fn defaults_are_valid() {
        let config = load(None, &[], &Overrides::default()).unwrap();
        assert_eq!(config.server.listen, "0.0.0.0:2121");
        assert_eq!(config.passive_ports(), 50000..=50019);
        assert!(config.tls.require);
        assert_eq!(config.storage.file_mode, Mode(0o644));
    }

    #[test]
    fn precedence_is_file_then_env_then_flags() {
        let toml = "[server]\nlisten = \"127.0.0.1:2001\"\ngreeting = \"from file\"\n[passive]\nports = \"40000-40009\"\nhost = \"192.0.2.1\"\n[log]\nxferlog_file = \"/var/log/file.xferlog\"\n[auth]\nmax_failed_logins = 3\n";
        let environment = [
            ("FTPSD_SERVER__LISTEN", "127.0.0.1:2002"),
            ("FTPSD_PASSIVE__PORTS", "41000-41009"),
            ("FTPSD_LOG__XFERLOG_FILE", "/var/log/env.xferlog"),
            ("FTPSD_AUTH__LOCKOUT_SECS", "60"),
        ];
        let overrides = Overrides {
            listen: Some("127.0.0.1:2003".to_string()),
            ..Overrides::default()
        };

        let config = load(Some(toml), &environment, &overrides).unwrap();

        assert_eq!(config.server.listen, "127.0.0.1:2003", "a flag beats the environment");
        assert_eq!(config.passive.ports, "41000-41009", "the environment beats the file");
        assert_eq!(config.passive.host, "192.0.2.1", "the file beats the default");
        assert_eq!(config.server.greeting, "from file");
        assert_eq!(config.server.idle_timeout_secs, 600, "an unset key keeps its default");
        assert_eq!(config.log.xferlog_file, Some(PathBuf::from("/var/log/env.xferlog")));
        assert_eq!(config.auth.max_failed_logins, 3);
        assert_eq!(config.auth.lockout_secs, 60);
        assert_eq!(config.server.drain_timeout_secs, 25);
    }

    #[test]
    fn lockout_without_duration_is_rejected() {
        let errors = load(
            Some("[auth]\nmax_failed_logins = 5\nlockout_secs = 0\n"),
            &[],
            &Overrides::default(),
        )
        .unwrap_err();
        assert!(errors.to_string().contains("auth.lockout_secs = 0"), "{errors}");
    }

    #[test]
    fn unknown_key_is_named() {
        let errors = load(Some("[server]\nlisen = \"0.0.0.0:21\"\n"), &[], &Overrides::default()).unwrap_err();
        assert!(errors.to_string().contains("lisen"), "{errors}");
    }

    #[test]
    fn unknown_environment_key_is_named() {
        let errors = load(None, &[("FTPSD_TLS__CERTFILE", "x.pem")], &Overrides::default()).unwrap_err();
        assert!(errors.to_string().contains("certfile"), "{errors}");
    }

    #[test]
    fn config_file_variable_is_not_a_key() {
        assert!(load(None, &[("FTPSD_CONFIG", "/etc/ftpsd/ftpsd.toml")], &Overrides::default()).is_ok());
    }

    #[test]
    fn port_range_errors_name_the_key() {
        for (value, expected) in [
            ("50019-50000", "reversed"),
            ("50000", "START-END"),
            ("0-10", "port 0"),
            ("100-2000", "privileged"),
            ("a-b", "START-END"),
        ] {
            let problem = parse_port_range(value).unwrap_err();
            assert!(problem.contains("passive.ports"), "{problem}");
            assert!(problem.contains(expected), "{value}: {problem}");
        }
    }

    #[test]
    fn control_port_inside_passive_range_is_rejected() {
        let overrides = Overrides {
            listen: Some("127.0.0.1:50005".to_string()),
            ..Overrides::default()
        };
        let errors = load(None, &[], &overrides).unwrap_err();
        assert!(errors.to_string().contains("contains the control port 50005"), "{errors}");
    }

    #[test]
    fn half_configured_tls_is_rejected() {
        let overrides = Overrides {
            cert_file: Some(PathBuf::from("/tmp/cert.pem")),
            ..Overrides::default()
        };
        let errors = load(None, &[], &overrides).unwrap_err();
        assert!(errors.to_string().contains("tls.key_file is not"), "{errors}");
    }

    #[test]
    fn service_link_variables_are_ignored() {
        let environment = [
            ("FTPSD_SERVICE_HOST", "10.96.0.12"),
            ("FTPSD_PORT", "tcp://10.96.0.12:21"),
            ("FTPSD_PORT_21_TCP_ADDR", "10.96.0.12"),
        ];
        assert!(load(None, &environment, &Overrides::default()).is_ok());
        let errors = load(None, &[("FTPSD_PASSIVE_PORTS", "1-2")], &Overrides::default()).unwrap_err();
        assert!(errors.to_string().contains("passive_ports"), "{errors}");
    }

    #[test]
    fn misspelt_levels_and_modes_are_rejected() {
        for level in ["warning", "loud", "ftpsd=verbose"] {
            let overrides = Overrides {
                log_level: Some(level.to_string()),
                ..Overrides::default()
            };
            let errors = load(None, &[], &overrides).unwrap_err();
            assert!(errors.to_string().contains("log.level"), "{level}: {errors}");
        }
        let errors = load(Some("[storage]\nfile_mode = 644\n"), &[], &Overrides::default()).unwrap_err();
        assert!(errors.to_string().contains("storage.file_mode = 1204"), "{errors}");
        let errors = load(Some("[storage]\nfile_mode = \"4755\"\n"), &[], &Overrides::default()).unwrap_err();
        assert!(errors.to_string().contains("setuid"), "{errors}");
        assert!(load(Some("[storage]\ndir_mode = \"2750\"\n"), &[], &Overrides::default()).is_ok());
    }

    #[test]
    fn pooled_mode_is_rejected() {
        let errors = load(Some("[passive]\nmode = \"pooled\"\n"), &[], &Overrides::default()).unwrap_err();
        assert!(errors.to_string().contains("passive.mode"), "{errors}");
    }

    #[test]
    fn passive_host_forms() {
        assert!(
            parse_passive_host("0.0.0.0")
                .unwrap_err()
                .contains("not an address clients can connect to")
        );
        assert_eq!(parse_passive_host("from-connection"), Ok(PassiveHost::FromConnection));
        assert_eq!(parse_passive_host("203.0.113.7"), Ok(PassiveHost::Ip([203, 0, 113, 7].into())));
        assert_eq!(
            parse_passive_host("ftp.example.com"),
            Ok(PassiveHost::Dns("ftp.example.com".to_string()))
        );
        assert!(parse_passive_host("::1").unwrap_err().contains("IPv6"));
        assert!(parse_passive_host("bad host!").unwrap_err().contains("passive.host"));
    }

    #[test]
    fn modes_read_octal_strings_and_integers() {
        let config = load(
            Some("[storage]\nfile_mode = \"0640\"\ndir_mode = 0o750\n"),
            &[],
            &Overrides::default(),
        )
        .unwrap();
        assert_eq!(config.storage.file_mode, Mode(0o640));
        assert_eq!(config.storage.dir_mode, Mode(0o750));

        let config = load(None, &[("FTPSD_STORAGE__FILE_MODE", "0600")], &Overrides::default()).unwrap();
        assert_eq!(config.storage.file_mode, Mode(0o600));

        let errors = load(Some("[storage]\nfile_mode = \"0689\"\n"), &[], &Overrides::default()).unwrap_err();
        assert!(errors.to_string().contains("0689"), "{errors}");
    }

    #[test]
    fn missing_config_file_is_named() {
        let errors = Config::load(Some(Path::new("/nonexistent/ftpsd.toml")), Vec::new(), &Overrides::default()).unwrap_err();
        assert!(errors.to_string().contains("/nonexistent/ftpsd.toml"), "{errors}");
    }
}
