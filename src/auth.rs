//! Users: the users file, argon2id password hashes, and the libunftp authenticator and user
//! detail provider built on them.

use std::{
    collections::HashMap,
    fmt,
    net::IpAddr,
    path::{Component, Path, PathBuf},
    sync::{Arc, RwLock},
};

use argon2::{
    Argon2,
    password_hash::{PasswordHash, PasswordHasher, SaltString, rand_core::OsRng},
};
use async_trait::async_trait;
use serde::Deserialize;
use unftp_core::auth::{AuthenticationError, Authenticator, Credentials, Principal, UserDetail, UserDetailError, UserDetailProvider};

/// Names that log in anonymously when `auth.anonymous` is on.
const ANONYMOUS_NAMES: [&str; 2] = ["anonymous", "ftp"];

/// Name of the user created for a run that has no users configured.
pub const GENERATED_USER: &str = "ftpsd";

/// Separates the user name from the peer address inside a [`Principal`]. libunftp hands the
/// provider only the principal, but the transfer log needs the peer. A control character cannot
/// occur in a user name that passed [`valid_user_name`].
const PRINCIPAL_SEPARATOR: char = '\n';

/// A password hash in PHC string form. Debug and Display never print it.
#[derive(Clone, Deserialize)]
#[serde(transparent)]
pub struct PasswordHashString(String);

impl fmt::Debug for PasswordHashString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// One `[[users]]` entry of the users file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct UserEntry {
    name: String,
    password_hash: PasswordHashString,
    #[serde(default)]
    home: Option<PathBuf>,
    #[serde(default)]
    read_only: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UsersFile {
    #[serde(default)]
    users: Vec<UserEntry>,
}

/// A user that may log in.
#[derive(Debug, Clone)]
pub struct UserRecord {
    pub name: String,
    password_hash: PasswordHashString,
    /// Home directory relative to the data directory; `None` is the data directory itself.
    pub home: Option<PathBuf>,
    pub read_only: bool,
}

/// Every user that may log in, as loaded from one version of the users file.
#[derive(Debug, Clone, Default)]
pub struct UserDb {
    users: HashMap<String, UserRecord>,
    anonymous_home: Option<Option<PathBuf>>,
}

impl UserDb {
    /// Parses and checks a users file; every message names the file and the entry.
    pub fn from_file(path: &Path) -> Result<UserDb, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|error| format!("cannot read users file {}: {error}: check auth.users_file", path.display()))?;
        UserDb::from_toml(&text, &path.display().to_string())
    }

    fn from_toml(text: &str, origin: &str) -> Result<UserDb, String> {
        let file: UsersFile = toml::from_str(text).map_err(|error| describe_toml_error(&error, text, origin))?;
        let mut db = UserDb::default();
        let mut problems = Vec::new();

        for entry in file.users {
            let context = format!("users file {origin}, user {:?}", entry.name);
            if !valid_user_name(&entry.name) {
                problems.push(format!(
                    "{context}: invalid name: use letters, digits, '.', '_', '-' and '@' (at most 64)"
                ));
                continue;
            }
            if ANONYMOUS_NAMES.contains(&entry.name.to_ascii_lowercase().as_str()) {
                problems.push(format!(
                    "{context}: this name is reserved for anonymous access: set auth.anonymous instead"
                ));
                continue;
            }
            if let Err(problem) = check_hash(&entry.password_hash.0) {
                problems.push(format!("{context}: password_hash {problem}: create one with `ftpsd hash-password`"));
                continue;
            }
            if let Some(home) = &entry.home
                && let Err(problem) = check_home(home)
            {
                problems.push(format!("{context}: home {}: {problem}", home.display()));
                continue;
            }
            if db.users.contains_key(&entry.name) {
                problems.push(format!("{context}: the name appears twice: keep one entry"));
                continue;
            }
            db.users.insert(
                entry.name.clone(),
                UserRecord {
                    name: entry.name,
                    password_hash: entry.password_hash,
                    home: entry.home.filter(|home| !home.as_os_str().is_empty()),
                    read_only: entry.read_only,
                },
            );
        }

        if problems.is_empty() { Ok(db) } else { Err(problems.join("\n")) }
    }

    /// Builds a database holding one user with the given password.
    pub fn with_single_user(name: &str, password: &str) -> UserDb {
        let mut db = UserDb::default();
        db.users.insert(
            name.to_string(),
            UserRecord {
                name: name.to_string(),
                password_hash: PasswordHashString(hash_password(password)),
                home: None,
                read_only: false,
            },
        );
        db
    }

    /// Turns on anonymous, read-only access rooted at `home` (relative to the data directory).
    pub fn allow_anonymous(&mut self, home: Option<PathBuf>) -> Result<(), String> {
        if let Some(home) = &home {
            check_home(home).map_err(|problem| format!("auth.anonymous_home = {}: {problem}", home.display()))?;
        }
        self.anonymous_home = Some(home);
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.users.len()
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty() && self.anonymous_home.is_none()
    }

    /// Home directories, relative to the data directory, that must exist before users log in.
    pub fn homes(&self) -> Vec<PathBuf> {
        let mut homes: Vec<PathBuf> = self.users.values().filter_map(|user| user.home.clone()).collect();
        if let Some(Some(home)) = &self.anonymous_home {
            homes.push(home.clone());
        }
        homes.sort();
        homes.dedup();
        homes
    }
}

/// Describes a parse error by line and column. toml's own Display quotes the offending line,
/// which would put a password typed by mistake into the log.
fn describe_toml_error(error: &toml::de::Error, text: &str, origin: &str) -> String {
    let position = error.span().map(|span| {
        let before = text.get(..span.start).unwrap_or(text);
        let line = before.matches('\n').count() + 1;
        let column = before.len() - before.rfind('\n').map_or(0, |newline| newline + 1) + 1;
        format!(" at line {line}, column {column}")
    });
    format!("invalid users file {origin}{}: {}", position.unwrap_or_default(), error.message())
}

/// Accepts names that are safe in logs, paths and FTP commands.
fn valid_user_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '@'))
}

fn check_home(home: &Path) -> Result<(), &'static str> {
    if home.is_absolute() {
        return Err("must be relative to storage.data_dir, such as \"alice\"");
    }
    if home.components().any(|component| !matches!(component, Component::Normal(_))) {
        return Err("must not contain '..' or '.' components");
    }
    Ok(())
}

/// Hashes a password with argon2id and the crate's default cost parameters.
pub fn hash_password(password: &str) -> String {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        // Hashing only fails for parameters out of range, and the defaults are in range.
        .expect("argon2 default parameters are valid")
        .to_string()
}

/// Largest argon2 memory cost accepted in a users file, in KiB. Each login in progress uses this
/// much memory, so a hash with a huge cost is a way to exhaust the pod's memory limit.
const MAX_HASH_MEMORY_KIB: u32 = 64 * 1024;
/// Largest argon2 time cost (passes) accepted in a users file.
const MAX_HASH_PASSES: u32 = 10;

/// Accepts argon2id PHC strings with a hash part and costs within the limits above.
fn check_hash(hash: &str) -> Result<(), String> {
    let parsed = PasswordHash::new(hash).map_err(|error| format!("is not a PHC hash string ({error})"))?;
    if parsed.algorithm.as_str() != "argon2id" {
        return Err(format!("uses {}, but only argon2id is accepted", parsed.algorithm));
    }
    if parsed.hash.is_none() || parsed.salt.is_none() {
        return Err("has no salt or no hash part (it looks truncated)".to_string());
    }
    let params = argon2::Params::try_from(&parsed).map_err(|error| format!("has invalid argon2 parameters ({error})"))?;
    if params.m_cost() > MAX_HASH_MEMORY_KIB || params.t_cost() > MAX_HASH_PASSES {
        return Err(format!(
            "costs m={} KiB, t={}, above the limits m={MAX_HASH_MEMORY_KIB} KiB, t={MAX_HASH_PASSES} that keep logins within memory",
            params.m_cost(),
            params.t_cost()
        ));
    }
    Ok(())
}

/// Caps the password checks that run at once. Each argon2id check with the default cost uses
/// 19 MiB while it runs. Without a cap, a burst of logins, wrong passwords included, grew the
/// process by that much per login: 100 parallel wrong passwords took it to 2 GB on a test machine.
static VERIFICATIONS: std::sync::LazyLock<tokio::sync::Semaphore> = std::sync::LazyLock::new(|| {
    let cores = std::thread::available_parallelism().map_or(2, usize::from);
    tokio::sync::Semaphore::new(cores.clamp(2, 8))
});

/// Argon2 working memory, one buffer per check that the semaphore above lets run, allocated once
/// and reused. Allocating 19 MiB per login instead made glibc's heap grow by about 10 MiB per
/// login, memory it never returned.
static MEMORY_POOL: std::sync::Mutex<Vec<Vec<argon2::Block>>> = std::sync::Mutex::new(Vec::new());

fn verify_password(password: &str, hash: &str) -> bool {
    let Ok(parsed) = PasswordHash::new(hash) else {
        return false;
    };
    let (Some(salt), Some(expected)) = (parsed.salt, parsed.hash) else {
        return false;
    };
    let (Ok(params), Ok(algorithm)) = (argon2::Params::try_from(&parsed), argon2::Algorithm::try_from(parsed.algorithm)) else {
        return false;
    };
    let version = match parsed.version.map(argon2::Version::try_from) {
        None => argon2::Version::default(),
        Some(Ok(version)) => version,
        Some(Err(_)) => return false,
    };
    let mut salt_bytes = [0_u8; 64];
    let Ok(salt) = salt.decode_b64(&mut salt_bytes) else {
        return false;
    };

    let mut memory = MEMORY_POOL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .pop()
        .unwrap_or_default();
    memory.resize(params.block_count(), argon2::Block::default());
    let mut output = vec![0_u8; expected.len()];
    let computed =
        Argon2::new(algorithm, version, params).hash_password_into_with_memory(password.as_bytes(), salt, &mut output, &mut memory[..]);
    MEMORY_POOL.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).push(memory);

    // password_hash::Output compares in constant time.
    computed.is_ok() && argon2::password_hash::Output::new(&output).is_ok_and(|output| output == expected)
}

/// The logged-in user that libunftp hands to the storage backend.
#[derive(Debug, Clone)]
pub struct FtpUser {
    pub name: String,
    /// Absolute home directory; `None` means the data directory.
    pub home: Option<PathBuf>,
    pub read_only: bool,
    /// Address of the client's control connection.
    pub peer: Option<IpAddr>,
}

impl fmt::Display for FtpUser {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

impl UserDetail for FtpUser {
    fn home(&self) -> Option<&Path> {
        self.home.as_deref()
    }
}

/// Checks passwords against the current [`UserDb`], which [`Users::replace`] swaps on reload.
#[derive(Debug)]
pub struct Users {
    db: RwLock<Arc<UserDb>>,
    data_dir: PathBuf,
    /// Verified against when the user is unknown, so that a wrong name costs as much time as a
    /// wrong password and does not reveal which names exist.
    dummy_hash: String,
}

impl Users {
    pub fn new(db: UserDb, data_dir: PathBuf) -> Self {
        Users {
            db: RwLock::new(Arc::new(db)),
            data_dir,
            dummy_hash: hash_password("dummy password for timing"),
        }
    }

    pub fn replace(&self, db: UserDb) {
        *self.db.write().unwrap_or_else(|poisoned| poisoned.into_inner()) = Arc::new(db);
    }

    pub fn current(&self) -> Arc<UserDb> {
        self.db.read().unwrap_or_else(|poisoned| poisoned.into_inner()).clone()
    }
}

#[async_trait]
impl Authenticator for Users {
    async fn authenticate(&self, username: &str, creds: &Credentials) -> Result<Principal, AuthenticationError> {
        let db = self.current();
        let principal = |name: &str| Principal {
            username: format!("{name}{PRINCIPAL_SEPARATOR}{}", creds.source_ip),
        };

        if db.anonymous_home.is_some() && ANONYMOUS_NAMES.contains(&username.to_ascii_lowercase().as_str()) {
            return Ok(principal("anonymous"));
        }

        let password = creds.password.clone().unwrap_or_default();
        let (hash, known) = match db.users.get(username) {
            Some(user) => (user.password_hash.0.clone(), true),
            None => (self.dummy_hash.clone(), false),
        };
        // argon2 takes tens of milliseconds of CPU: keep it off the async worker threads.
        // The semaphore is never closed, so acquire() cannot fail.
        let _permit = VERIFICATIONS.acquire().await.expect("the verification semaphore is never closed");
        let matches = tokio::task::spawn_blocking(move || verify_password(&password, &hash))
            .await
            .map_err(|error| AuthenticationError::with_source("password check failed", error))?;

        match (known, matches) {
            (true, true) => Ok(principal(username)),
            (true, false) => Err(AuthenticationError::BadPassword),
            (false, _) => Err(AuthenticationError::BadUser),
        }
    }
}

#[async_trait]
impl UserDetailProvider for Users {
    type User = FtpUser;

    async fn provide_user_detail(&self, principal: &Principal) -> Result<FtpUser, UserDetailError> {
        let (name, peer) = match principal.username.split_once(PRINCIPAL_SEPARATOR) {
            Some((name, peer)) => (name, peer.parse().ok()),
            None => (principal.username.as_str(), None),
        };
        let db = self.current();

        if name == "anonymous"
            && let Some(home) = &db.anonymous_home
        {
            return Ok(FtpUser {
                name: name.to_string(),
                home: home.as_ref().map(|home| self.data_dir.join(home)),
                read_only: true,
                peer,
            });
        }

        let user = db.users.get(name).ok_or_else(|| UserDetailError::UserNotFound {
            username: name.to_string(),
        })?;
        Ok(FtpUser {
            name: user.name.clone(),
            home: user.home.as_ref().map(|home| self.data_dir.join(home)),
            read_only: user.read_only,
            peer,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn credentials(password: &str) -> Credentials {
        let mut creds = Credentials::from(password);
        creds.source_ip = [192, 0, 2, 10].into();
        creds
    }

    fn sample_db() -> UserDb {
        let hash = hash_password("secret");
        let text = format!(
            "[[users]]\nname = \"alice\"\npassword_hash = \"{hash}\"\nhome = \"alice\"\n\n[[users]]\nname = \"reader\"\npassword_hash = \"{hash}\"\nread_only = true\n"
        );
        UserDb::from_toml(&text, "users.toml").unwrap()
    }

    #[tokio::test]
    async fn login_checks_password_and_carries_peer() {
        let users = Users::new(sample_db(), PathBuf::from("/srv/ftp"));

        let principal = users.authenticate("alice", &credentials("secret")).await.unwrap();
        let user = users.provide_user_detail(&principal).await.unwrap();

        assert_eq!(user.name, "alice");
        assert_eq!(user.home, Some(PathBuf::from("/srv/ftp/alice")));
        assert_eq!(user.peer, Some([192, 0, 2, 10].into()));
        assert!(!user.read_only);
    }

    #[tokio::test]
    async fn wrong_password_and_unknown_user_fail() {
        let users = Users::new(sample_db(), PathBuf::from("/srv/ftp"));
        assert!(matches!(
            users.authenticate("alice", &credentials("wrong")).await,
            Err(AuthenticationError::BadPassword)
        ));
        assert!(matches!(
            users.authenticate("mallory", &credentials("secret")).await,
            Err(AuthenticationError::BadUser)
        ));
    }

    #[tokio::test]
    async fn anonymous_only_when_enabled() {
        let mut db = sample_db();
        let users = Users::new(db.clone(), PathBuf::from("/srv/ftp"));
        assert!(users.authenticate("anonymous", &credentials("x")).await.is_err());

        db.allow_anonymous(Some(PathBuf::from("public"))).unwrap();
        users.replace(db);
        let principal = users.authenticate("ftp", &credentials("anything")).await.unwrap();
        let user = users.provide_user_detail(&principal).await.unwrap();
        assert!(user.read_only);
        assert_eq!(user.home, Some(PathBuf::from("/srv/ftp/public")));
    }

    #[test]
    fn users_file_problems_name_the_entry() {
        let cases = [
            ("[[users]]\nname = \"bob\"\npassword_hash = \"plain\"\n", "hash-password"),
            ("[[users]]\nname = \"bad name\"\npassword_hash = \"x\"\n", "invalid name"),
            (
                "[[users]]\nname = \"eve\"\npassword_hash = \"$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA\"\nhome = \"../etc\"\n",
                "'..'",
            ),
            ("[[users]]\nname = \"eve\"\npassword = \"secret\"\n", "unknown field"),
            (
                "[[users]]\nname = \"ivan\"\npassword_hash = \"$argon2i$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA\"\n",
                "only argon2id",
            ),
            (
                "[[users]]\nname = \"tim\"\npassword_hash = \"$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ\"\n",
                "truncated",
            ),
            (
                "[[users]]\nname = \"max\"\npassword_hash = \"$argon2id$v=19$m=4194304,t=100,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA\"\n",
                "above the limits",
            ),
        ];
        for (text, expected) in cases {
            let problem = UserDb::from_toml(text, "users.toml").unwrap_err();
            assert!(problem.contains("users.toml"), "{problem}");
            assert!(problem.contains(expected), "{text}: {problem}");
        }
    }

    #[test]
    fn parse_errors_do_not_quote_the_file() {
        let problem = UserDb::from_toml("[[users]]\nname = \"eve\"\npassword = \"hunter2\"\n", "users.toml").unwrap_err();
        assert!(problem.contains("users.toml at line 3, column 1"), "{problem}");
        assert!(problem.contains("unknown field `password`"), "{problem}");
        assert!(!problem.contains("hunter2"), "{problem}");
        assert!(!problem.contains('\n'), "{problem}");
    }

    #[test]
    fn password_hash_debug_is_redacted() {
        let db = sample_db();
        let printed = format!("{db:?}");
        assert!(!printed.contains("argon2"), "{printed}");
    }
}
