//! The ledger, written: `<run dir>/ledger.log`, appended with `O_APPEND` by
//! the orchestrator and every consumer process, one line per event in a
//! single `write`, so that it survives `kill -9` and Redis restarts. The
//! line formats are listed in the doc comment of `main.rs`; [`crate::tally`]
//! reads them back.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

/// Microseconds since the Unix epoch: comparable across the processes.
pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// The append-only ledger: one line per event, each in a single `write`.
pub struct Ledger {
    file: File,
}

impl Ledger {
    pub fn open(path: &Path) -> std::io::Result<Self> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        Ok(Self { file })
    }

    pub fn try_append(&self, line: &str) -> std::io::Result<()> {
        let mut buf = Vec::with_capacity(line.len() + 1);
        buf.extend_from_slice(line.as_bytes());
        buf.push(b'\n');
        let written = (&self.file).write(&buf)?;
        if written == buf.len() {
            Ok(())
        } else {
            Err(std::io::Error::other(format!(
                "short write to the ledger ({written} of {} bytes)",
                buf.len()
            )))
        }
    }

    pub fn append(&self, line: &str) {
        if let Err(err) = self.try_append(line) {
            eprintln!("ledger write failed ({line}): {err}");
        }
    }
}
