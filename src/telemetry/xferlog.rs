//! The transfer log in the xferlog format (xferlog(5) of wu-ftpd and ProFTPD, also written by
//! vsftpd), built from the `transfer finished` events of `crate::storage`:
//!
//! ```text
//! Thu Dec  4 21:40:07 2025 3 192.0.2.10 209715200 /big.bin b _ i r alice ftp 0 * c
//! ```
//!
//! The fields, in order:
//! - current time, transfer time in whole seconds (rounded up), client address, bytes;
//! - file name as the client named it, with spaces and control characters replaced by `_`;
//! - transfer type `b`, because libunftp transfers every file as binary, and special action `_`;
//! - direction (`i` upload, `o` download), access mode (`a` anonymous, `r` other users);
//! - user name, service `ftp`, authentication method `0`, authenticated user id `*`;
//! - completion status (`c` complete, `i` failed or incomplete).
//!
//! NOTE: the time is UTC, where xferlog(5) specifies local time; containers run on UTC.

use std::{
    fs::{File, OpenOptions},
    io::{self, Write as _},
    path::{Path, PathBuf},
    sync::Mutex,
    time::{SystemTime, UNIX_EPOCH},
};

use tracing::{Event, Subscriber, field::Field};
use tracing_subscriber::{field::Visit, layer::Context};

/// Target and message of the events that `crate::storage` emits once per transfer.
const TRANSFER_TARGET: &str = "ftpsd::storage";
const TRANSFER_MESSAGE: &str = "transfer finished";

/// The open transfer log, set by [`install`]; `None` while the transfer log is off.
static SINK: Mutex<Option<Sink>> = Mutex::new(None);

struct Sink {
    path: PathBuf,
    file: File,
}

/// An opened transfer log file, checked before the server starts and then handed to [`install`].
pub struct XferlogFile {
    path: PathBuf,
    file: File,
}

/// Opens (creating when missing) the transfer log for appending.
pub fn open(path: &Path) -> io::Result<XferlogFile> {
    let file = open_append(path)?;
    Ok(XferlogFile {
        path: path.to_path_buf(),
        file,
    })
}

fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

/// Starts writing transfers to `file`.
pub fn install(file: XferlogFile) {
    *lock_sink() = Some(Sink {
        path: file.path,
        file: file.file,
    });
}

/// Reopens the transfer log under its path, so that a rotated file is replaced by a new one.
/// Returns the path, or `None` when the transfer log is off.
pub fn reopen() -> io::Result<Option<PathBuf>> {
    let mut sink = lock_sink();
    let Some(sink) = sink.as_mut() else {
        return Ok(None);
    };
    sink.file = open_append(&sink.path)?;
    Ok(Some(sink.path.clone()))
}

fn lock_sink() -> std::sync::MutexGuard<'static, Option<Sink>> {
    // A writer that panicked mid-write leaves a whole File behind; the log stays usable.
    SINK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The `tracing` layer that turns transfer events into xferlog lines.
pub struct XferlogLayer;

impl<S: Subscriber> tracing_subscriber::Layer<S> for XferlogLayer {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        if event.metadata().target() != TRANSFER_TARGET {
            return;
        }
        let mut transfer = Transfer::default();
        event.record(&mut transfer);
        if transfer.message != TRANSFER_MESSAGE {
            return;
        }

        let mut sink = lock_sink();
        let Some(sink) = sink.as_mut() else {
            return;
        };
        let line = transfer.line(SystemTime::now());
        // One write per line: with O_APPEND the kernel keeps concurrent lines whole.
        if let Err(error) = sink.file.write_all(line.as_bytes()) {
            // Logged through tracing, which does not come back here: the target differs.
            tracing::error!(path = %sink.path.display(), %error, "cannot write to the transfer log");
        }
    }
}

/// The fields of one `transfer finished` event.
#[derive(Debug, Default, PartialEq)]
struct Transfer {
    message: String,
    user: String,
    peer: String,
    path: String,
    direction: String,
    result: String,
    bytes: u64,
    duration_ms: u64,
}

impl Visit for Transfer {
    fn record_u64(&mut self, field: &Field, value: u64) {
        match field.name() {
            "bytes" => self.bytes = value,
            "duration_ms" => self.duration_ms = value,
            _ => {}
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.record_text(field, value.to_string());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.record_text(field, format!("{value:?}"));
    }
}

impl Transfer {
    fn record_text(&mut self, field: &Field, value: String) {
        let slot = match field.name() {
            "message" => &mut self.message,
            "user" => &mut self.user,
            "peer" => &mut self.peer,
            "path" => &mut self.path,
            "direction" => &mut self.direction,
            "result" => &mut self.result,
            _ => return,
        };
        *slot = value;
    }

    fn line(&self, now: SystemTime) -> String {
        let seconds = self.duration_ms.div_ceil(1000);
        let direction = if self.direction == "upload" { 'i' } else { 'o' };
        let access_mode = if self.user == "anonymous" { 'a' } else { 'r' };
        let status = if self.result == "ok" { 'c' } else { 'i' };
        format!(
            "{} {seconds} {} {} {} b _ {direction} {access_mode} {} ftp 0 * {status}\n",
            ctime(now),
            field_or_dash(&self.peer),
            self.bytes,
            escape(&self.path),
            field_or_dash(&escape(&self.user)),
        )
    }
}

/// Replaces what would split or break the line, as ProFTPD's xferlog(5) describes for file names.
fn escape(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_whitespace() || c.is_control() { '_' } else { c })
        .collect()
}

fn field_or_dash(text: &str) -> &str {
    if text.is_empty() { "-" } else { text }
}

/// Formats a time as ctime(3) does, `DDD MMM dd hh:mm:ss YYYY`, in UTC.
fn ctime(time: SystemTime) -> String {
    const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];

    let seconds = time.duration_since(UNIX_EPOCH).map_or(0, |since| since.as_secs());
    let days = seconds / 86_400;
    let second_of_day = seconds % 86_400;
    let (year, month, day) = civil_from_days(days);
    format!(
        "{} {} {day:>2} {:02}:{:02}:{:02} {year}",
        // 1970-01-01 was a Thursday.
        DAYS[(days % 7) as usize],
        MONTHS[(month - 1) as usize],
        second_of_day / 3600,
        second_of_day % 3600 / 60,
        second_of_day % 60,
    )
}

/// Converts days since 1970-01-01 to a (year, month, day) date in the proleptic Gregorian
/// calendar, with Howard Hinnant's `civil_from_days` algorithm.
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let day_of_era = z - era * 146_097;
    let year_of_era = (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 { month_index + 3 } else { month_index - 9 };
    let year = year_of_era + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn ctime_matches_known_dates() {
        let at = |seconds| UNIX_EPOCH + Duration::from_secs(seconds);
        assert_eq!(ctime(at(0)), "Thu Jan  1 00:00:00 1970");
        // date -u -d @951782400: Tue Feb 29 00:00:00 UTC 2000
        assert_eq!(ctime(at(951_782_400)), "Tue Feb 29 00:00:00 2000");
        // date -u -d @1764884407: Thu Dec  4 21:40:07 UTC 2025
        assert_eq!(ctime(at(1_764_884_407)), "Thu Dec  4 21:40:07 2025");
    }

    #[test]
    fn line_has_the_xferlog_fields() {
        let transfer = Transfer {
            message: TRANSFER_MESSAGE.to_string(),
            user: "alice".to_string(),
            peer: "192.0.2.10".to_string(),
            path: "/dir/a file.bin".to_string(),
            direction: "upload".to_string(),
            result: "ok".to_string(),
            bytes: 209_715_200,
            duration_ms: 2_001,
        };
        let line = transfer.line(UNIX_EPOCH + Duration::from_secs(1_764_884_407));
        assert_eq!(
            line,
            "Thu Dec  4 21:40:07 2025 3 192.0.2.10 209715200 /dir/a_file.bin b _ i r alice ftp 0 * c\n"
        );

        let failed = Transfer {
            direction: "download".to_string(),
            result: "incomplete".to_string(),
            user: "anonymous".to_string(),
            ..transfer
        };
        let fields: Vec<String> = failed.line(UNIX_EPOCH).split_whitespace().map(str::to_string).collect();
        assert_eq!(fields.len(), 18, "{fields:?}");
        assert_eq!(fields[11], "o");
        assert_eq!(fields[12], "a");
        assert_eq!(fields[17], "i");
    }
}
