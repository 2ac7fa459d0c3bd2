//! The sent journal: sent records made durable by one append and one `fdatasync`
//! instead of a flush of the whole database.
//!
//! A sled flush hands its buffers to sled's I/O threads and back: about twice the CPU
//! of an append to a file of our own and its `fdatasync` (BENCHMARKS.md, SMTP). The
//! flusher thread inserts each sent record into sled (in memory, written out by sled's
//! own flushes) and appends it here; once the journal has grown past
//! [`CHECKPOINT_BYTES`], or whenever the database is flushed for another reason, a
//! flush covers every record in it and the journal starts again, empty. At open, what
//! the journal holds is put back into sled before anything reads it.
//!
//! A record is `key length (u16 LE) | key | unix seconds (u64 BE) | CRC-32 of the rest
//! (u32 LE)`. A crash mid-append leaves a torn last record, which fails its length or
//! checksum: replay stops there. That record's caller had not been told it was stored.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::error_event::{ErrorCounter, ErrorEvent};

/// Journal size at which the database is flushed and the journal emptied.
pub(in crate::store) const CHECKPOINT_BYTES: u64 = 1 << 20;

/// The journal's file in the store's directory (sled leaves names it does not use alone).
const FILE_NAME: &str = "sent.journal";

pub(in crate::store) struct Journal {
    path: PathBuf,
    state: Mutex<State>,
    errors: ErrorCounter,
}

struct State {
    file: File,
    /// Bytes appended since the journal was last emptied.
    len: u64,
    /// An append failed part-way: later appends would follow a torn record that stops
    /// replay, so until the journal is emptied every commit flushes the database.
    torn: bool,
}

/// What a commit made durable, and how.
pub(in crate::store) enum Commit {
    /// Appended and synced; the database need not be flushed.
    Appended,
    /// Flush the database, then call [`Journal::emptied`].
    FlushDatabase,
}

impl Journal {
    /// Opens the journal in `dir`, puts every whole record it holds into `sent`, flushes
    /// the database and empties the journal.
    pub(in crate::store) fn open(
        dir: &Path,
        db: &sled::Db,
        sent: &super::SentTrees,
        errors: ErrorCounter,
    ) -> Result<Self, super::StoreError> {
        let path = dir.join(FILE_NAME);
        let io = |e: std::io::Error| super::StoreError::Journal { path: path.clone(), source: e };
        let mut file = std::fs::OpenOptions::new().create(true).read(true).append(true).open(&path).map_err(io)?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).map_err(io)?;
        let mut records = replay(&bytes);
        let mut count = 0usize;
        for (key, at) in records.by_ref() {
            sent.insert(key, at)?;
            count += 1;
        }
        if !bytes.is_empty() {
            db.flush()?;
            tracing::info!(
                records = count,
                torn_bytes = bytes.len() - records.read,
                path = %path.display(),
                "sent records put back from the journal"
            );
            file.set_len(0).map_err(io)?;
            file.sync_all().map_err(io)?;
        }
        Ok(Self { path, state: Mutex::new(State { file, len: 0, torn: false }), errors })
    }

    /// Appends `records` (encoded by [`encode`]) and syncs them, or says the database
    /// must be flushed instead: the journal is due for a checkpoint, or cannot be
    /// written.
    pub(in crate::store) fn commit(&self, records: &[u8]) -> Commit {
        let mut state = self.state.lock().expect("journal lock");
        if state.torn || state.len + records.len() as u64 > CHECKPOINT_BYTES {
            return Commit::FlushDatabase;
        }
        let written = state.file.write_all(records).and_then(|()| state.file.sync_data());
        match written {
            Ok(()) => {
                state.len += records.len() as u64;
                Commit::Appended
            }
            Err(e) => {
                self.unusable(&mut state, &e, "written");
                Commit::FlushDatabase
            }
        }
    }

    /// The database was flushed after every record appended so far: start again, empty.
    pub(in crate::store) fn emptied(&self) {
        let mut state = self.state.lock().expect("journal lock");
        if state.len == 0 && !state.torn {
            return;
        }
        // Not synced: should a crash undo the truncation, replay puts back records the
        // database already holds. The next append's `fdatasync` makes it durable. The
        // file is in append mode, so that append goes to the new end.
        match state.file.set_len(0) {
            Ok(()) => (state.len, state.torn) = (0, false),
            Err(e) => self.unusable(&mut state, &e, "emptied"),
        }
    }

    /// Reports that the journal could not be `what` (written, emptied) and marks it
    /// unusable until the database has been flushed.
    fn unusable(&self, state: &mut State, e: &std::io::Error, what: &str) {
        crate::error_event!(
            self.errors,
            ErrorEvent::Journal,
            error = %e,
            path = %self.path.display(),
            "sent journal not {what}; flushing the store instead"
        );
        state.torn = true;
    }
}

/// Appends one record to `out`.
pub(in crate::store) fn encode(out: &mut Vec<u8>, key: &[u8], at: u64) {
    let start = out.len();
    out.extend_from_slice(&(key.len() as u16).to_le_bytes());
    out.extend_from_slice(key);
    out.extend_from_slice(&at.to_be_bytes());
    let crc = crc32fast::hash(&out[start..]);
    out.extend_from_slice(&crc.to_le_bytes());
}

/// The whole records at the start of `bytes`.
fn replay(bytes: &[u8]) -> Records<'_> {
    Records { bytes, read: 0 }
}

struct Records<'a> {
    bytes: &'a [u8],
    /// Bytes of whole records read so far.
    read: usize,
}

impl<'a> Iterator for Records<'a> {
    type Item = (&'a [u8], u64);

    fn next(&mut self) -> Option<Self::Item> {
        let rest = &self.bytes[self.read..];
        let key_len = u16::from_le_bytes(rest.get(..2)?.try_into().ok()?) as usize;
        let body = rest.get(..2 + key_len + 8)?;
        let crc = u32::from_le_bytes(rest.get(body.len()..body.len() + 4)?.try_into().ok()?);
        if crc32fast::hash(body) != crc {
            return None;
        }
        self.read += body.len() + 4;
        let at = u64::from_be_bytes(body[2 + key_len..].try_into().ok()?);
        Some((&body[2..2 + key_len], at))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_read_back_as_written_and_a_torn_or_corrupt_tail_ends_replay() {
        let mut bytes = Vec::new();
        encode(&mut bytes, b"first", 1);
        encode(&mut bytes, b"", 2);
        encode(&mut bytes, &[0xff; 300], u64::MAX);
        let whole = bytes.clone();
        let read: Vec<_> = replay(&whole).collect();
        assert_eq!(read, [(&b"first"[..], 1), (&b""[..], 2), (&[0xff; 300][..], u64::MAX)]);

        // Torn anywhere inside the last record: the first two survive.
        let last = whole.len() - (2 + 300 + 8 + 4);
        for cut in last..whole.len() {
            assert_eq!(replay(&whole[..cut]).count(), 2, "cut at {cut}");
        }
        // A flipped bit in the second record stops replay before it.
        let mut corrupt = whole.clone();
        corrupt[2 + 5 + 8 + 4 + 3] ^= 1;
        assert_eq!(replay(&corrupt).count(), 1);
    }
}
