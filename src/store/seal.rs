//! Encryption at rest: a key ring that seals and opens stored tokens.
//!
//! Refresh and access tokens are stored sealed with XChaCha20-Poly1305 under a
//! [`KeyRing`]. Each sealed value records the id of the key that sealed it, so
//! keys can rotate: the ring's first key (the primary) seals, every key in the
//! ring opens, and [`KeyRing::key_id_of`] finds values still sealed under an
//! older key so they can be re-sealed. The caller binds associated data (session
//! id and column name) to each value, so a value copied into another row or
//! column fails to open.
//!
//! Keys come from a key file ([`KeyRing::load_file`]) or the `TOKENBROKER_KEYS`
//! value ([`KeyRing::parse`]), never from the database. Key bytes live only in
//! zeroizing buffers, cleared when the last clone of a ring drops, and never
//! appear in `Debug` output or error messages.
//!
//! # Sealed format
//!
//! | bytes | content                                   |
//! |-------|-------------------------------------------|
//! | 3     | magic `tb1`                               |
//! | 1     | key id length `n` (1..=32)                |
//! | n     | key id (ASCII `[A-Za-z0-9_-]`)            |
//! | 24    | random nonce                              |
//! | rest  | ciphertext, then the 16-byte Poly1305 tag |
//!
//! The header (magic, length and key id) is authenticated together with the
//! caller's associated data; neither is encrypted, and the associated data is
//! not stored. Nonces are 24 random bytes from the OS, which XChaCha20 makes safe
//! to choose at random for any number of values under one key.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use chacha20poly1305::aead::AeadInPlace;
use chacha20poly1305::{KeyInit, Tag, XChaCha20Poly1305, XNonce};
use rand::TryRngCore;
use rand::rngs::OsRng;
use zeroize::Zeroizing;

/// First bytes of every sealed value; names the format version.
const MAGIC: &[u8; 3] = b"tb1";
/// Key length of XChaCha20-Poly1305.
const KEY_LEN: usize = 32;
/// Nonce length of XChaCha20-Poly1305.
const NONCE_LEN: usize = 24;
/// Poly1305 tag length.
const TAG_LEN: usize = 16;
/// What a valid key id looks like, for error messages.
const ID_RULE: &str = "1 to 32 characters of A-Z a-z 0-9 _ -";
/// First line of the text [`KeyRing::to_text`] writes.
const TEXT_HEADER: &str =
    "# tokenbroker key ring: the first key seals; the others only open older values.\n";

/// The name of a key in a [`KeyRing`], recorded in every value it seals.
///
/// Invariant: 1 to 32 ASCII characters from `[A-Za-z0-9_-]`, so it fits the
/// one-byte length of the sealed format and is safe to print.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyId(String);

impl KeyId {
    /// Longest allowed id, in bytes.
    pub const MAX_LEN: usize = 32;

    /// Checks `id` against the rule; the error does not echo it, since a
    /// mangled key file line could put key material where an id belongs.
    pub fn new(id: &str) -> Result<Self, KeyError> {
        if is_valid_id(id.as_bytes()) {
            Ok(Self(id.to_owned()))
        } else {
            Err(KeyError::InvalidId)
        }
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `k<unix-seconds>`: the id of a freshly generated key.
    pub fn timestamped(now: SystemTime) -> Self {
        let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        // "k" and at most 20 digits: always a valid id.
        Self(format!("k{secs}"))
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for KeyId {
    type Err = KeyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

fn is_valid_id(id: &[u8]) -> bool {
    (1..=KeyId::MAX_LEN).contains(&id.len())
        && id
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Where an entry sits in key text, for error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryPos {
    /// 1-based line number.
    pub line: usize,
    /// 1-based position in the line's comma-separated list; `None` when the
    /// line holds a single entry.
    pub entry: Option<usize>,
}

impl fmt::Display for EntryPos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.entry {
            Some(entry) => write!(f, "line {}, entry {entry}", self.line),
            None => write!(f, "line {}", self.line),
        }
    }
}

/// What is wrong with one `KEY_ID:BASE64` entry. Never carries key material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EntryProblem {
    /// No `:` between id and key.
    #[error("expected `KEY_ID:BASE64`")]
    MissingSeparator,
    /// The id breaks the [`KeyId`] rule.
    #[error("invalid key id: expected {ID_RULE}")]
    InvalidId,
    /// The key is not standard, padded base64.
    #[error("key is not valid base64 (standard alphabet, padded)")]
    InvalidBase64,
    /// The key decodes to the wrong number of bytes.
    #[error("key decodes to {len} bytes; expected 32")]
    WrongLength {
        /// Decoded length.
        len: usize,
    },
    /// The id was already used by an earlier entry.
    #[error("key id `{0}` appears more than once")]
    DuplicateId(KeyId),
}

/// Failure to build, read or write a key ring. Messages name the file, line and
/// key id at fault, never key bytes.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// One entry of the key text is invalid.
    #[error("{at}: {problem}")]
    Entry {
        /// Where the entry is.
        at: EntryPos,
        /// What is wrong with it.
        problem: EntryProblem,
    },
    /// The key text holds no key.
    #[error("no keys: expected at least one `KEY_ID:BASE64` entry")]
    Empty,
    /// A key id given on its own breaks the [`KeyId`] rule.
    #[error("invalid key id: expected {ID_RULE}")]
    InvalidId,
    /// Combining rings would give two keys one id.
    #[error("key id `{0}` is already in the key ring")]
    DuplicateId(KeyId),
    /// The key file could not be opened or read.
    #[error("reading key file {}: {source}", path.display())]
    Read {
        /// The key file.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// The key file's text is invalid.
    #[error("key file {}: {source}", path.display())]
    Parse {
        /// The key file.
        path: PathBuf,
        /// What is wrong with its text.
        source: Box<KeyError>,
    },
    /// The key file is readable by users other than its owner.
    #[error(
        "key file {p} is accessible to group or others (mode {mode:03o}); restrict it with `chmod 600 {p}`",
        p = path.display()
    )]
    Permissions {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// [`KeyRing::create_file`] found a file in the way.
    #[error("key file {} already exists; refusing to overwrite it", path.display())]
    Exists {
        /// The existing file.
        path: PathBuf,
    },
    /// The new key file could not be written.
    #[error("writing key file {}: {source}", path.display())]
    Write {
        /// The key file.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
}

/// Why a sealed value did not open.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum SealError {
    /// Not in the sealed format: wrong magic, bad key id, or too short.
    #[error("sealed value is malformed")]
    Malformed,
    /// Sealed under a key this ring does not hold.
    #[error("value sealed under key `{0}`, which is not in the key ring")]
    UnknownKey(KeyId),
    /// The tag check failed: wrong key, wrong associated data, or tampered.
    #[error("sealed value failed authentication (wrong key, wrong associated data, or tampered)")]
    Forged,
}

/// One key: its id and its bytes, zeroized on drop.
#[derive(Clone)]
struct Key {
    id: KeyId,
    secret: Zeroizing<[u8; KEY_LEN]>,
}

impl Key {
    /// A cipher instance; it holds its own copy of the key and zeroizes it on drop.
    fn cipher(&self) -> XChaCha20Poly1305 {
        let key: &chacha20poly1305::Key = (&*self.secret).into();
        XChaCha20Poly1305::new(key)
    }
}

/// The keys of a ring; the primary is separate so a ring is never empty.
struct Keys {
    primary: Key,
    /// Keys that only open, in order of preference; ids unique across the ring.
    older: Vec<Key>,
}

impl Keys {
    fn iter(&self) -> impl Iterator<Item = &Key> {
        std::iter::once(&self.primary).chain(&self.older)
    }

    fn get(&self, id: &str) -> Option<&Key> {
        self.iter().find(|key| key.id.as_str() == id)
    }
}

/// Encryption keys by id: the primary seals, every key opens.
///
/// Invariants: at least one key; ids unique. Cloning shares the keys; their
/// bytes are zeroized when the last clone drops. `Debug` shows ids only.
#[derive(Clone)]
pub struct KeyRing {
    keys: Arc<Keys>,
}

impl fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ids: Vec<&str> = self.keys.iter().map(|key| key.id.as_str()).collect();
        f.debug_struct("KeyRing")
            .field("primary", &self.primary().as_str())
            .field("ids", &ids)
            .finish_non_exhaustive()
    }
}

impl KeyRing {
    /// Parses key text: a key file, or the `TOKENBROKER_KEYS` value.
    ///
    /// One `KEY_ID:BASE64` entry per line or comma-separated, where BASE64
    /// (standard alphabet, padded) decodes to exactly 32 bytes. Whitespace
    /// around entries, blank lines and `#` comments are ignored. The first key
    /// is the primary; the others only open older values. Duplicate ids and an
    /// empty ring are errors.
    pub fn parse(text: &str) -> Result<Self, KeyError> {
        let entries = entries(text);
        let mut entries = entries.iter();
        let Some((at, item)) = entries.next() else {
            return Err(KeyError::Empty);
        };
        let primary = parse_entry(item).map_err(|problem| KeyError::Entry { at: *at, problem })?;
        // Sized up front: growing would copy key bytes and free the old buffer unzeroized.
        let mut older: Vec<Key> = Vec::with_capacity(entries.len());
        for (at, item) in entries {
            let key = parse_entry(item).map_err(|problem| KeyError::Entry { at: *at, problem })?;
            if key.id == primary.id || older.iter().any(|old| old.id == key.id) {
                return Err(KeyError::Entry {
                    at: *at,
                    problem: EntryProblem::DuplicateId(key.id.clone()),
                });
            }
            older.push(key);
        }
        Ok(Self {
            keys: Arc::new(Keys { primary, older }),
        })
    }

    /// Reads and parses a key file.
    ///
    /// On unix, refuses a file whose mode grants group or others any access
    /// (`mode & 0o077 != 0`): the error names the path and the fix. Blocking
    /// I/O: call at startup or from `spawn_blocking`.
    pub fn load_file(path: &Path) -> Result<Self, KeyError> {
        let read_error = |source| KeyError::Read {
            path: path.to_owned(),
            source,
        };
        let mut file = File::open(path).map_err(read_error)?;
        // Checked on the open file, so the file read is the file checked.
        let metadata = file.metadata().map_err(read_error)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = metadata.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                return Err(KeyError::Permissions {
                    path: path.to_owned(),
                    mode,
                });
            }
        }
        // Room for the whole file, so reading does not reallocate and leave
        // unzeroized copies of the text behind.
        let capacity = usize::try_from(metadata.len()).map_or(0, |len| len.saturating_add(1));
        let mut text = Zeroizing::new(String::with_capacity(capacity));
        file.read_to_string(&mut text).map_err(read_error)?;
        Self::parse(&text).map_err(|source| KeyError::Parse {
            path: path.to_owned(),
            source: Box::new(source),
        })
    }

    /// A ring holding one new random key (from the OS) under `id`.
    ///
    /// # Panics
    ///
    /// If the OS random source fails: no key can be made safely without it.
    pub fn generate(id: KeyId) -> Self {
        let mut secret = Zeroizing::new([0u8; KEY_LEN]);
        os_random(&mut *secret);
        Self {
            keys: Arc::new(Keys {
                primary: Key { id, secret },
                older: Vec::new(),
            }),
        }
    }

    /// Creates the key file `path` holding a new ring with one generated key,
    /// id `k<unix-seconds>`, and returns that ring.
    ///
    /// The file is created exclusively (never overwrites: [`KeyError::Exists`]),
    /// with mode 0600 on unix, and synced with its directory before returning,
    /// since losing it makes every sealed token unreadable. A file left
    /// half-written by a failed write is removed. Blocking I/O.
    pub fn create_file(path: &Path) -> Result<Self, KeyError> {
        if path.exists() {
            return Err(KeyError::Exists {
                path: path.to_owned(),
            });
        }
        let ring = Self::generate(KeyId::timestamped(SystemTime::now()));
        // Written beside it and renamed into place: a crash mid-write never
        // leaves a partial key file behind to block the next start.
        ring.replace_file(path)?;
        Ok(ring)
    }

    /// Writes this ring to `path`, which must not exist (0600, synced with
    /// its directory; a half-written file is removed).
    fn write_new(&self, path: &Path) -> Result<(), KeyError> {
        let write_error = |source| KeyError::Write {
            path: path.to_owned(),
            source,
        };
        let mut options = OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let mut file = options.open(path).map_err(|source| {
            if source.kind() == io::ErrorKind::AlreadyExists {
                KeyError::Exists {
                    path: path.to_owned(),
                }
            } else {
                write_error(source)
            }
        })?;
        let written = file
            .write_all(self.to_text().as_bytes())
            .and_then(|()| file.sync_all());
        drop(file);
        if let Err(source) = written {
            // Best effort: a partial key file would block the next attempt.
            let _ = fs::remove_file(path);
            return Err(write_error(source));
        }
        sync_parent_dir(path).map_err(write_error)
    }

    /// Replaces the key file at `path` with this ring, atomically: written
    /// to a temporary file beside it (0600), then renamed over it.
    pub fn replace_file(&self, path: &Path) -> Result<(), KeyError> {
        let mut temporary = path.as_os_str().to_owned();
        temporary.push(".new");
        let temporary = std::path::PathBuf::from(temporary);
        let _ = fs::remove_file(&temporary);
        self.write_new(&temporary)?;
        fs::rename(&temporary, path).map_err(|source| KeyError::Write {
            path: path.to_owned(),
            source,
        })?;
        sync_parent_dir(path).map_err(|source| KeyError::Write {
            path: path.to_owned(),
            source,
        })
    }

    /// The ring as key text (primary first, one `KEY_ID:BASE64` line per key,
    /// after a `#` comment line), for writing a key file. [`KeyRing::parse`]
    /// reads it back into the same ring.
    pub fn to_text(&self) -> Zeroizing<String> {
        // 44 base64 characters encode 32 bytes.
        let len = TEXT_HEADER.len()
            + self
                .keys
                .iter()
                .map(|key| key.id.as_str().len() + 1 + 44 + 1)
                .sum::<usize>();
        // Sized up front so pushing never reallocates and strands a copy.
        let mut text = Zeroizing::new(String::with_capacity(len));
        text.push_str(TEXT_HEADER);
        for key in self.keys.iter() {
            text.push_str(key.id.as_str());
            text.push(':');
            STANDARD.encode_string(key.secret.as_slice(), &mut text);
            text.push('\n');
        }
        text
    }

    /// A ring whose primary is `new`'s primary, followed by `new`'s other keys
    /// and then every key of `self`, all kept for opening. Fails with
    /// [`KeyError::DuplicateId`] if the two rings share an id.
    pub fn with_primary(&self, new: KeyRing) -> Result<Self, KeyError> {
        let mut older: Vec<Key> = Vec::with_capacity(new.keys.older.len() + self.len());
        older.extend(new.keys.older.iter().cloned());
        for key in self.keys.iter() {
            if new.contains(&key.id) {
                return Err(KeyError::DuplicateId(key.id.clone()));
            }
            older.push(key.clone());
        }
        Ok(Self {
            keys: Arc::new(Keys {
                primary: new.keys.primary.clone(),
                older,
            }),
        })
    }

    /// The id of the key that seals.
    pub fn primary(&self) -> &KeyId {
        &self.keys.primary.id
    }

    /// Whether the ring holds a key with this id.
    pub fn contains(&self, id: &KeyId) -> bool {
        self.keys.get(id.as_str()).is_some()
    }

    /// Every key id, primary first.
    pub fn ids(&self) -> Vec<KeyId> {
        self.keys.iter().map(|key| key.id.clone()).collect()
    }

    /// Number of keys (at least one).
    pub fn len(&self) -> usize {
        1 + self.keys.older.len()
    }

    /// Always `false`: a ring holds at least one key.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Seals `plaintext` under the primary key with a fresh random nonce.
    ///
    /// `aad` (the caller's associated data, e.g. session id and column name) is
    /// authenticated but not stored: [`KeyRing::open`] needs the same bytes.
    /// The result holds no plaintext bytes.
    ///
    /// # Panics
    ///
    /// If the OS random source fails (no nonce can be chosen safely without it),
    /// or if `plaintext` is 256 GiB or longer, beyond what XChaCha20 can encrypt
    /// under one nonce.
    pub fn seal(&self, plaintext: &[u8], aad: &[u8]) -> Vec<u8> {
        let key = &self.keys.primary;
        let id = key.id.as_str().as_bytes();
        let header_len = MAGIC.len() + 1 + id.len();
        let body_start = header_len + NONCE_LEN;
        // Exact capacity: the plaintext is copied in once and encrypted in place,
        // never reallocated, so no copy of it is left behind.
        let mut sealed = Vec::with_capacity(body_start + plaintext.len() + TAG_LEN);
        sealed.extend_from_slice(MAGIC);
        // Cannot truncate: a KeyId is at most 32 bytes.
        sealed.push(id.len() as u8);
        sealed.extend_from_slice(id);
        let mut nonce = XNonce::default();
        os_random(&mut nonce);
        sealed.extend_from_slice(&nonce);
        sealed.extend_from_slice(plaintext);

        let associated = associated_data(&sealed[..header_len], aad);
        let (_, body) = sealed.split_at_mut(body_start);
        let tag = match key
            .cipher()
            .encrypt_in_place_detached(&nonce, &associated, body)
        {
            Ok(tag) => tag,
            // The cipher refuses only messages of 2^32 blocks (256 GiB) or more.
            Err(_) => panic!(
                "cannot seal {} bytes: beyond the cipher's limit",
                plaintext.len()
            ),
        };
        sealed.extend_from_slice(&tag);
        sealed
    }

    /// Opens a value that [`KeyRing::seal`] produced under any key of this
    /// ring, checking it against the same `aad`.
    ///
    /// Errors: [`SealError::Malformed`] if it is not in the sealed format
    /// (including any truncation that leaves less than a header, nonce and tag),
    /// [`SealError::UnknownKey`] if its key is not in the ring, and
    /// [`SealError::Forged`] if the tag does not match (wrong key, wrong `aad`,
    /// or any change to the header, nonce, ciphertext or tag).
    pub fn open(&self, sealed: &[u8], aad: &[u8]) -> Result<Zeroizing<Vec<u8>>, SealError> {
        let parts = Parts::parse(sealed)?;
        let key = self
            .keys
            .get(parts.key_id)
            .ok_or_else(|| SealError::UnknownKey(KeyId(parts.key_id.to_owned())))?;
        let associated = associated_data(parts.header, aad);
        let mut plaintext = Zeroizing::new(parts.ciphertext.to_vec());
        key.cipher()
            .decrypt_in_place_detached(
                &XNonce::from(*parts.nonce),
                &associated,
                &mut plaintext,
                &Tag::from(*parts.tag),
            )
            .map_err(|_| SealError::Forged)?;
        Ok(plaintext)
    }

    /// The id of the key that sealed `sealed`, without opening it: finds values
    /// to re-seal after a rotation. Only the format is checked, not the tag.
    pub fn key_id_of(sealed: &[u8]) -> Result<KeyId, SealError> {
        Parts::parse(sealed).map(|parts| KeyId(parts.key_id.to_owned()))
    }
}

/// A sealed value split into its fields; see the module docs for the format.
struct Parts<'a> {
    /// Magic, id length and id: authenticated with the caller's data.
    header: &'a [u8],
    /// A valid [`KeyId`].
    key_id: &'a str,
    nonce: &'a [u8; NONCE_LEN],
    ciphertext: &'a [u8],
    tag: &'a [u8; TAG_LEN],
}

impl<'a> Parts<'a> {
    fn parse(sealed: &'a [u8]) -> Result<Self, SealError> {
        let rest = sealed.strip_prefix(MAGIC).ok_or(SealError::Malformed)?;
        let (&id_len, rest) = rest.split_first().ok_or(SealError::Malformed)?;
        let (id, rest) = rest
            .split_at_checked(usize::from(id_len))
            .ok_or(SealError::Malformed)?;
        if !is_valid_id(id) {
            return Err(SealError::Malformed);
        }
        let key_id = std::str::from_utf8(id).map_err(|_| SealError::Malformed)?;
        let (nonce, rest) = rest
            .split_first_chunk::<NONCE_LEN>()
            .ok_or(SealError::Malformed)?;
        let (ciphertext, tag) = rest
            .split_last_chunk::<TAG_LEN>()
            .ok_or(SealError::Malformed)?;
        let header = sealed
            .get(..MAGIC.len() + 1 + id.len())
            .ok_or(SealError::Malformed)?;
        Ok(Self {
            header,
            key_id,
            nonce,
            ciphertext,
            tag,
        })
    }
}

/// What the AEAD authenticates besides the ciphertext: the sealed header, then
/// the caller's data. The header is self-delimiting (its length byte), so no two
/// (header, aad) pairs give the same bytes.
fn associated_data(header: &[u8], aad: &[u8]) -> Vec<u8> {
    let mut data = Vec::with_capacity(header.len() + aad.len());
    data.extend_from_slice(header);
    data.extend_from_slice(aad);
    data
}

/// Fills `buf` from the operating system's random source.
///
/// # Panics
///
/// If the OS has no randomness to give (on Linux, only when `getrandom(2)` is
/// unavailable and `/dev/urandom` unreadable). No key or nonce can be made
/// safely without it and no caller could recover; `rand`'s thread-local
/// generator panics in the same case.
fn os_random(buf: &mut [u8]) {
    if let Err(err) = OsRng.try_fill_bytes(buf) {
        panic!("the operating system's random source failed: {err}");
    }
}

/// Splits key text into entries with their positions, dropping comments
/// (from `#` to the end of the line, as neither ids nor base64 use `#`),
/// whitespace and empty entries.
fn entries(text: &str) -> Vec<(EntryPos, &str)> {
    let mut entries = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let content = line.split_once('#').map_or(line, |(before, _)| before);
        let items: Vec<&str> = content
            .split(',')
            .map(str::trim)
            .filter(|item| !item.is_empty())
            .collect();
        let several = items.len() > 1;
        for (position, item) in items.into_iter().enumerate() {
            let at = EntryPos {
                line: index + 1,
                entry: several.then_some(position + 1),
            };
            entries.push((at, item));
        }
    }
    entries
}

/// Parses one `KEY_ID:BASE64` entry.
fn parse_entry(item: &str) -> Result<Key, EntryProblem> {
    let (id, encoded) = item.split_once(':').ok_or(EntryProblem::MissingSeparator)?;
    let id = KeyId::new(id.trim()).map_err(|_| EntryProblem::InvalidId)?;
    let mut decoded = Zeroizing::new(Vec::new());
    STANDARD
        .decode_vec(encoded.trim(), &mut decoded)
        .map_err(|_| EntryProblem::InvalidBase64)?;
    if decoded.len() != KEY_LEN {
        return Err(EntryProblem::WrongLength { len: decoded.len() });
    }
    let mut secret = Zeroizing::new([0u8; KEY_LEN]);
    secret.copy_from_slice(&decoded);
    Ok(Key { id, secret })
}

/// Makes a new directory entry durable (unix); elsewhere a no-op.
fn sync_parent_dir(path: &Path) -> io::Result<()> {
    #[cfg(unix)]
    {
        let parent = match path.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent,
            _ => Path::new("."),
        };
        File::open(parent)?.sync_all()?;
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const AAD: &[u8] = b"session-1\0refresh_token";

    fn b64(byte: u8) -> String {
        STANDARD.encode([byte; KEY_LEN])
    }

    fn ring(entries: &[(&str, u8)]) -> KeyRing {
        let text: String = entries
            .iter()
            .map(|(id, byte)| format!("{id}:{}\n", b64(*byte)))
            .collect();
        KeyRing::parse(&text).unwrap()
    }

    fn id(s: &str) -> KeyId {
        KeyId::new(s).unwrap()
    }

    /// Length of a sealed value's header for key id `id`.
    fn header_len(id: &str) -> usize {
        MAGIC.len() + 1 + id.len()
    }

    fn entry_error(text: &str) -> (EntryPos, EntryProblem, String) {
        match KeyRing::parse(text) {
            Err(err @ KeyError::Entry { .. }) => {
                let message = err.to_string();
                let KeyError::Entry { at, problem } = err else {
                    unreachable!()
                };
                (at, problem, message)
            }
            other => panic!("expected an entry error, got {other:?}"),
        }
    }

    #[test]
    fn round_trip() {
        let ring = ring(&[("k1", 1)]);
        for plaintext in [&b"refresh-token-value"[..], b"", &[0u8; 1000]] {
            let sealed = ring.seal(plaintext, AAD);
            assert_eq!(ring.open(&sealed, AAD).unwrap().as_slice(), plaintext);
            assert_eq!(KeyRing::key_id_of(&sealed).unwrap(), id("k1"));
        }
    }

    #[test]
    fn sealed_value_does_not_contain_the_plaintext() {
        let ring = ring(&[("k1", 1)]);
        let plaintext = b"a-refresh-token-that-must-not-leak";
        let sealed = ring.seal(plaintext, AAD);
        assert!(sealed.starts_with(b"tb1\x02k1"));
        assert_eq!(
            sealed.len(),
            header_len("k1") + NONCE_LEN + plaintext.len() + TAG_LEN
        );
        // No 8-byte run of the plaintext survives anywhere.
        for window in plaintext.windows(8) {
            assert!(!sealed.windows(8).any(|w| w == window));
        }
    }

    #[test]
    fn sealing_twice_differs() {
        let ring = ring(&[("k1", 1)]);
        let a = ring.seal(b"same", AAD);
        let b = ring.seal(b"same", AAD);
        assert_ne!(a, b);
        let nonce = header_len("k1")..header_len("k1") + NONCE_LEN;
        assert_ne!(a[nonce.clone()], b[nonce]);
    }

    #[test]
    fn wrong_associated_data_is_forged() {
        let ring = ring(&[("k1", 1)]);
        let sealed = ring.seal(b"token", b"session-1\0refresh_token");
        for other in [
            &b"session-2\0refresh_token"[..],
            b"session-1\0access_token",
            b"",
        ] {
            assert_eq!(ring.open(&sealed, other), Err(SealError::Forged));
        }
    }

    #[test]
    fn any_flipped_bit_is_rejected() {
        let ring = ring(&[("k1", 1)]);
        let sealed = ring.seal(b"token", AAD);
        let magic_and_id = header_len("k1");
        for index in 0..sealed.len() {
            for bit in 0..8 {
                let mut tampered = sealed.clone();
                tampered[index] ^= 1 << bit;
                let result = ring.open(&tampered, AAD);
                if index < MAGIC.len() {
                    assert_eq!(result, Err(SealError::Malformed), "byte {index} bit {bit}");
                } else if index < magic_and_id {
                    // The id length or id now names another (or no valid) key.
                    assert!(
                        matches!(result, Err(SealError::Malformed | SealError::UnknownKey(_))),
                        "byte {index} bit {bit}: {result:?}"
                    );
                } else {
                    assert_eq!(result, Err(SealError::Forged), "byte {index} bit {bit}");
                }
            }
        }
    }

    #[test]
    fn relabelling_to_another_key_of_the_ring_is_forged() {
        let ring = ring(&[("k1", 1), ("k2", 2)]);
        let mut sealed = ring.seal(b"token", AAD);
        sealed[MAGIC.len() + 2] = b'2';
        assert_eq!(KeyRing::key_id_of(&sealed).unwrap(), id("k2"));
        assert_eq!(ring.open(&sealed, AAD), Err(SealError::Forged));
    }

    #[test]
    fn truncated_is_malformed_below_the_minimum_and_forged_above() {
        let ring = ring(&[("k1", 1)]);
        let sealed = ring.seal(b"token", AAD);
        let minimum = header_len("k1") + NONCE_LEN + TAG_LEN;
        for len in 0..sealed.len() {
            let expected = if len < minimum {
                SealError::Malformed
            } else {
                SealError::Forged
            };
            assert_eq!(ring.open(&sealed[..len], AAD), Err(expected), "len {len}");
            if len < minimum {
                assert_eq!(
                    KeyRing::key_id_of(&sealed[..len]),
                    Err(SealError::Malformed)
                );
            }
        }
    }

    #[test]
    fn malformed_headers() {
        let ring = ring(&[("k1", 1)]);
        let mut sealed = ring.seal(b"token", AAD);
        sealed[0] = b'x';
        assert_eq!(ring.open(&sealed, AAD), Err(SealError::Malformed));

        let body = [0u8; NONCE_LEN + TAG_LEN];
        let zero_len = [&b"tb1\x00"[..], &body].concat();
        let bad_char = [&b"tb1\x02k!"[..], &body].concat();
        let too_long = [&b"tb1\x21"[..], &[b'a'; 33], &body].concat();
        for value in [zero_len, bad_char, too_long] {
            assert_eq!(ring.open(&value, AAD), Err(SealError::Malformed));
            assert_eq!(KeyRing::key_id_of(&value), Err(SealError::Malformed));
        }
    }

    #[test]
    fn key_not_in_ring_is_unknown() {
        let sealed = ring(&[("other", 9)]).seal(b"token", AAD);
        let ring = ring(&[("k1", 1)]);
        assert_eq!(
            ring.open(&sealed, AAD),
            Err(SealError::UnknownKey(id("other")))
        );
    }

    #[test]
    fn same_id_different_bytes_is_forged() {
        let sealed = ring(&[("k1", 9)]).seal(b"token", AAD);
        assert_eq!(
            ring(&[("k1", 1)]).open(&sealed, AAD),
            Err(SealError::Forged)
        );
    }

    #[test]
    fn new_primary_seals_and_old_keys_still_open() {
        let old = ring(&[("k1", 1)]);
        let before = old.seal(b"old token", AAD);

        let rotated = old.with_primary(KeyRing::generate(id("k2"))).unwrap();
        assert_eq!(rotated.primary(), &id("k2"));
        assert_eq!(rotated.ids(), vec![id("k2"), id("k1")]);
        assert!(rotated.contains(&id("k1")) && rotated.contains(&id("k2")));
        assert_eq!(rotated.len(), 2);

        let after = rotated.seal(b"new token", AAD);
        assert_eq!(KeyRing::key_id_of(&after).unwrap(), id("k2"));
        assert_eq!(KeyRing::key_id_of(&before).unwrap(), id("k1"));
        assert_eq!(rotated.open(&before, AAD).unwrap().as_slice(), b"old token");
        assert_eq!(rotated.open(&after, AAD).unwrap().as_slice(), b"new token");
        assert_eq!(old.open(&after, AAD), Err(SealError::UnknownKey(id("k2"))));

        // The text form keeps the order and the keys.
        let reread = KeyRing::parse(&rotated.to_text()).unwrap();
        assert_eq!(reread.ids(), rotated.ids());
        assert_eq!(reread.open(&before, AAD).unwrap().as_slice(), b"old token");
        assert_eq!(reread.open(&after, AAD).unwrap().as_slice(), b"new token");
    }

    #[test]
    fn with_primary_refuses_a_reused_id() {
        let old = ring(&[("k1", 1), ("k2", 2)]);
        let err = old.with_primary(ring(&[("k2", 3)])).unwrap_err();
        assert!(matches!(&err, KeyError::DuplicateId(dup) if dup == &id("k2")));
        assert!(err.to_string().contains("`k2`"));
    }

    #[test]
    fn parse_accepts_comments_blank_lines_commas_and_whitespace() {
        let text = format!(
            "# keys\r\n\n  k1 : {}  # current\r\nold-key_2:{},k3:{},\n\n",
            b64(1),
            b64(2),
            b64(3)
        );
        let ring = KeyRing::parse(&text).unwrap();
        assert_eq!(ring.ids(), vec![id("k1"), id("old-key_2"), id("k3")]);
        assert_eq!(ring.primary(), &id("k1"));
        // The same keys as a comma-separated env value open the same values.
        let sealed = ring.seal(b"token", AAD);
        let env = format!("k1:{}, old-key_2:{}", b64(1), b64(2));
        assert_eq!(
            KeyRing::parse(&env)
                .unwrap()
                .open(&sealed, AAD)
                .unwrap()
                .as_slice(),
            b"token"
        );
    }

    #[test]
    fn parse_errors_name_the_line_and_never_the_key() {
        let good = format!("k1:{}", b64(1));
        let cases: Vec<(String, usize, EntryProblem)> = vec![
            (
                format!("# c\n{good}\n\nk2:not*base64==\n"),
                4,
                EntryProblem::InvalidBase64,
            ),
            (
                format!("{good}\nk2:{}\n", STANDARD.encode([2u8; 16])),
                2,
                EntryProblem::WrongLength { len: 16 },
            ),
            (
                format!("{good}\n# c\nk2:{}\n", STANDARD.encode([2u8; 33])),
                3,
                EntryProblem::WrongLength { len: 33 },
            ),
            (format!("bad id:{}\n", b64(2)), 1, EntryProblem::InvalidId),
            (
                format!("{good}\n{}:{}\n", "a".repeat(33), b64(2)),
                2,
                EntryProblem::InvalidId,
            ),
            (
                format!("{good}\n\n{}\n", b64(2)),
                3,
                EntryProblem::MissingSeparator,
            ),
            (
                format!("{good}\n# again\nk1:{}\n", b64(2)),
                3,
                EntryProblem::DuplicateId(id("k1")),
            ),
        ];
        for (text, line, problem) in cases {
            let (at, got, message) = entry_error(&text);
            assert_eq!((at.line, &got), (line, &problem), "{text:?}");
            assert!(message.starts_with(&format!("line {line}: ")), "{message}");
            for byte in [1, 2] {
                assert!(!message.contains(&b64(byte)), "{message}");
            }
        }
    }

    #[test]
    fn parse_error_in_a_comma_list_names_the_entry() {
        let text = format!("k1:{},k2:short", b64(1));
        let (at, problem, message) = entry_error(&text);
        assert_eq!(
            at,
            EntryPos {
                line: 1,
                entry: Some(2)
            }
        );
        assert_eq!(problem, EntryProblem::InvalidBase64);
        assert!(message.starts_with("line 1, entry 2: "), "{message}");
    }

    #[test]
    fn reversed_entry_does_not_echo_the_key() {
        // Someone wrote BASE64:ID: the "id" is key material and must not be printed.
        let text = format!("{}:k1", b64(7));
        let (_, problem, message) = entry_error(&text);
        assert_eq!(problem, EntryProblem::InvalidId);
        assert!(!message.contains(&b64(7)[..8]), "{message}");
    }

    #[test]
    fn empty_ring_is_an_error() {
        for text in ["", "\n\n", "# only a comment\n  \n", " , ,"] {
            assert!(
                matches!(KeyRing::parse(text), Err(KeyError::Empty)),
                "{text:?}"
            );
        }
    }

    #[test]
    fn key_id_rule() {
        assert_eq!(id("a-Z_09").to_string(), "a-Z_09");
        assert!(KeyId::new(&"x".repeat(32)).is_ok());
        for bad in ["", "has space", "dot.ted", "plus+", "é", &"x".repeat(33)] {
            assert!(
                matches!(KeyId::new(bad), Err(KeyError::InvalidId)),
                "{bad:?}"
            );
        }
        assert_eq!("k1".parse::<KeyId>().unwrap(), id("k1"));
        let stamped =
            KeyId::timestamped(UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000));
        assert_eq!(stamped.as_str(), "k1700000000");
        assert!(KeyId::new(&format!("k{}", u64::MAX)).is_ok());
    }

    #[test]
    fn debug_shows_ids_but_no_key_bytes() {
        let ring = ring(&[("k1", 0xab), ("k0", 0xcd)]);
        let debug = format!("{ring:?}");
        assert!(debug.contains("k1") && debug.contains("k0"), "{debug}");
        for byte in [0xab, 0xcd] {
            let encoded = b64(byte);
            assert!(!debug.contains(&encoded[..8]), "{debug}");
            assert!(!debug.contains(&byte.to_string()), "{debug}");
            assert!(!debug.contains(&format!("{byte:x}")), "{debug}");
        }
        // The text form is the one place the bytes appear.
        assert!(ring.to_text().contains(&b64(0xab)));
    }

    #[cfg(unix)]
    fn mode_of(path: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt;
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn create_file_then_load_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys");
        let created = KeyRing::create_file(&path).unwrap();
        #[cfg(unix)]
        assert_eq!(mode_of(&path), 0o600);
        assert!(created.primary().as_str().starts_with('k'));

        let loaded = KeyRing::load_file(&path).unwrap();
        assert_eq!(loaded.ids(), created.ids());
        let sealed = created.seal(b"token", AAD);
        assert_eq!(loaded.open(&sealed, AAD).unwrap().as_slice(), b"token");

        let before = fs::read(&path).unwrap();
        let err = KeyRing::create_file(&path).unwrap_err();
        assert!(
            matches!(&err, KeyError::Exists { path: p } if p == &path),
            "{err:?}"
        );
        assert!(err.to_string().contains(&path.display().to_string()));
        assert_eq!(
            fs::read(&path).unwrap(),
            before,
            "the existing file was changed"
        );
    }

    #[cfg(unix)]
    #[test]
    fn replace_file_swaps_the_ring_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys");
        let old = KeyRing::create_file(&path).unwrap();
        let rotated = old
            .with_primary(KeyRing::generate(KeyId::new("next").unwrap()))
            .unwrap();
        rotated.replace_file(&path).unwrap();
        let back = KeyRing::load_file(&path).unwrap();
        assert_eq!(back.primary().as_str(), "next");
        assert!(back.contains(old.primary()));
        assert!(!dir.path().join("keys.new").exists());
    }

    #[test]
    fn load_file_refuses_a_file_others_can_read() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys");
        fs::write(&path, ring(&[("k1", 1)]).to_text().as_bytes()).unwrap();
        for mode in [0o644, 0o640, 0o604, 0o601] {
            fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
            let err = KeyRing::load_file(&path).unwrap_err();
            assert!(matches!(err, KeyError::Permissions { mode: m, .. } if m == mode));
            let message = err.to_string();
            assert!(message.contains(&path.display().to_string()), "{message}");
            assert!(message.contains("chmod 600"), "{message}");
        }
        fs::set_permissions(&path, fs::Permissions::from_mode(0o400)).unwrap();
        assert_eq!(KeyRing::load_file(&path).unwrap().ids(), vec![id("k1")]);
    }

    #[test]
    fn load_file_errors_name_the_path_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing");
        let err = KeyRing::load_file(&missing).unwrap_err();
        assert!(matches!(err, KeyError::Read { .. }), "{err:?}");
        assert!(err.to_string().contains(&missing.display().to_string()));

        let path = dir.path().join("keys");
        let mut options = OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let mut file = options.open(&path).unwrap();
        write!(file, "# keys\nk1:{}\nk2:nope\n", b64(1)).unwrap();
        drop(file);
        let err = KeyRing::load_file(&path).unwrap_err();
        let message = err.to_string();
        assert!(
            message.contains(&path.display().to_string()) && message.contains("line 3: "),
            "{message}"
        );
        assert!(!message.contains(&b64(1)), "{message}");
    }
}
