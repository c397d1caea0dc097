//! Model signing: Ed25519 signatures over model artifacts, with named keys and rotation.
//!
//! What is signed is never the artifact bytes but a canonical, domain-separated message
//! ([`signed_message`]):
//!
//! ```text
//! kip-model-signature-v1\n
//! org=<org uuid, hyphenated lowercase>\n
//! name=<model name>\n
//! version=<model version>\n
//! sha256=<64 lowercase hex digits of the artifact>\n
//! ```
//!
//! Invariants:
//! - A signature binds the organisation, model name, version and artifact digest: it cannot be
//!   replayed for another model, another version, another organisation's model or another
//!   artifact. Fields are newline-terminated and may not contain `\n`, `\r` or NUL, so no two
//!   field tuples share a message. The domain line keeps these signatures apart from anything
//!   else a key might ever sign.
//! - Only the sha256 is signed, so re-signing an artifact (key rotation) needs the stored
//!   digest, not the bytes.
//! - A signature names its key ([`KeyId`]: sha256 of the key's SubjectPublicKeyInfo DER,
//!   i.e. `openssl pkey -pubin -outform DER | sha256sum`). Verification looks the key up among
//!   the trusted keys by id; an unknown id fails as [`SigningError::UnknownKey`] before any
//!   cryptography, a known key with a bad signature as [`SigningError::BadSignature`].
//! - Rotation: the verifier trusts a *set* of public keys. During an overlap it holds the old
//!   and the new key; once every artifact is re-signed with the new key the old key is
//!   removed, and from then on its signatures fail ([`SigningKeyStore`] keeps these files).
//! - Private keys are PKCS#8 PEM (`PRIVATE KEY`), written like the CA keys: mode 0600 from
//!   the start, atomically ([`crate::files::write_private`]). `Debug` never prints them.

use std::{
    fmt,
    path::{Path, PathBuf},
    str::FromStr,
    time::SystemTime,
};

use ring::{
    rand::SystemRandom,
    signature::{ED25519, Ed25519KeyPair, KeyPair as _, UnparsedPublicKey},
};
use rustls::pki_types::{
    PrivatePkcs8KeyDer, SubjectPublicKeyInfoDer,
    pem::{PemObject as _, SectionKind},
};
use uuid::Uuid;

use crate::{
    CertError,
    files::{read, write_private, write_public},
    identity::{parse_hex, to_hex},
    tls::pem_block,
};

/// First line of every signed message (see the module docs). A new message layout gets a new
/// domain (`-v2`), never a changed meaning of `v1`.
pub const SIGNATURE_DOMAIN: &str = "kip-model-signature-v1";
/// Prefix of the text form of a [`Signature`].
pub const SIGNATURE_TEXT_PREFIX: &str = "ed25519";
/// Longest model name or version accepted in a signed message, in bytes.
pub const MAX_FIELD_BYTES: usize = 256;

/// DER prefix of an Ed25519 SubjectPublicKeyInfo (RFC 8410): SEQUENCE { SEQUENCE { OID
/// 1.3.101.112 }, BIT STRING (33 bytes, 0 unused bits) }, followed by the 32 key bytes.
const ED25519_SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];
const PUBLIC_KEY_LEN: usize = 32;
const SIGNATURE_LEN: usize = 64;

/// Everything signing and verification can fail with.
#[derive(Debug, thiserror::Error)]
pub enum SigningError {
    /// The private key is not an Ed25519 PKCS#8 key, or key generation failed.
    #[error("invalid Ed25519 signing key: {0}")]
    Key(String),
    /// A public key is not an Ed25519 SubjectPublicKeyInfo.
    #[error("invalid Ed25519 public key: {0}")]
    PublicKey(String),
    /// PEM text holds no item of the expected kind, or a malformed one.
    #[error("invalid PEM ({what}): {message}")]
    Pem { what: &'static str, message: String },
    /// A field of the signed message cannot be encoded canonically.
    #[error("{field}: {reason}")]
    Field { field: &'static str, reason: String },
    /// The text form of a signature is malformed.
    #[error("malformed signature: {0}")]
    Malformed(String),
    /// The signature names a key that is not (or no longer) trusted.
    #[error("signature key {0} is not trusted (unknown or retired)")]
    UnknownKey(KeyId),
    /// The signature does not verify under the key it names: the artifact, its metadata or
    /// the signature was changed.
    #[error("signature by key {0} does not match this model (tampered or for another model)")]
    BadSignature(KeyId),
    /// The trusted key set is empty, so nothing could ever verify.
    #[error("no trusted model signing key is configured")]
    NoTrustedKeys,
    /// Reading or writing a key file failed.
    #[error(transparent)]
    File(#[from] CertError),
    /// A key store directory is not in the expected state.
    #[error("{path}: {message}")]
    Store { path: PathBuf, message: String },
}

fn field_err(field: &'static str, reason: impl Into<String>) -> SigningError {
    SigningError::Field {
        field,
        reason: reason.into(),
    }
}

/// Names a public key: sha256 over its SubjectPublicKeyInfo DER. Text form: 64 lowercase hex.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyId([u8; 32]);

impl KeyId {
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&to_hex(&self.0))
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({self})")
    }
}

impl FromStr for KeyId {
    type Err = SigningError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_hex_array(s)
            .map(Self)
            .ok_or_else(|| SigningError::Malformed("key id must be 64 lowercase hex digits".into()))
    }
}

/// `s` as exactly `N` bytes of lowercase hex.
fn parse_hex_array<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != 2 * N || s.bytes().any(|b| b.is_ascii_uppercase()) {
        return None;
    }
    parse_hex(s)?.try_into().ok()
}

/// An Ed25519 public key that verifies model signatures.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct PublicKey {
    raw: [u8; PUBLIC_KEY_LEN],
    id: KeyId,
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.id)
    }
}

impl PublicKey {
    /// From the 32 raw key bytes.
    pub fn from_raw(raw: &[u8]) -> Result<Self, SigningError> {
        let raw: [u8; PUBLIC_KEY_LEN] = raw.try_into().map_err(|_| {
            SigningError::PublicKey(format!(
                "an Ed25519 key has {PUBLIC_KEY_LEN} bytes, got {}",
                raw.len()
            ))
        })?;
        let id = KeyId(sha256(&spki_der(&raw)));
        Ok(Self { raw, id })
    }

    /// From SubjectPublicKeyInfo DER (what `openssl pkey -pubout -outform DER` writes).
    pub fn from_spki_der(der: &[u8]) -> Result<Self, SigningError> {
        match der.strip_prefix(&ED25519_SPKI_PREFIX[..]) {
            Some(raw) if raw.len() == PUBLIC_KEY_LEN => Self::from_raw(raw),
            _ => Err(SigningError::PublicKey(
                "not an Ed25519 SubjectPublicKeyInfo (RFC 8410)".into(),
            )),
        }
    }

    /// From one `PUBLIC KEY` PEM block.
    pub fn from_pem(pem: &str) -> Result<Self, SigningError> {
        let der = SubjectPublicKeyInfoDer::from_pem_slice(pem.as_bytes()).map_err(|e| {
            SigningError::Pem {
                what: "public key",
                message: e.to_string(),
            }
        })?;
        Self::from_spki_der(der.as_ref())
    }

    /// Every `PUBLIC KEY` block of `pem` (a trust set: during rotation the old and the new
    /// key). Blocks of other kinds are ignored; at least one key must be present, and a key
    /// listed twice is kept once.
    pub fn all_from_pem(pem: &str) -> Result<Vec<Self>, SigningError> {
        let mut keys: Vec<Self> = Vec::new();
        for item in <(SectionKind, Vec<u8>)>::pem_slice_iter(pem.as_bytes()) {
            let (kind, der) = item.map_err(|e| SigningError::Pem {
                what: "public keys",
                message: e.to_string(),
            })?;
            if kind == SectionKind::PublicKey {
                let key = Self::from_spki_der(&der)?;
                if !keys.contains(&key) {
                    keys.push(key);
                }
            }
        }
        if keys.is_empty() {
            return Err(SigningError::Pem {
                what: "public keys",
                message: "no PUBLIC KEY block".into(),
            });
        }
        Ok(keys)
    }

    /// SubjectPublicKeyInfo DER.
    pub fn to_spki_der(&self) -> Vec<u8> {
        spki_der(&self.raw)
    }

    /// One `PUBLIC KEY` PEM block.
    pub fn to_pem(&self) -> String {
        pem_block("PUBLIC KEY", &self.to_spki_der())
    }

    pub fn raw(&self) -> &[u8; PUBLIC_KEY_LEN] {
        &self.raw
    }

    pub fn key_id(&self) -> KeyId {
        self.id
    }
}

fn spki_der(raw: &[u8; PUBLIC_KEY_LEN]) -> Vec<u8> {
    let mut der = ED25519_SPKI_PREFIX.to_vec();
    der.extend_from_slice(raw);
    der
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    use sha2::Digest as _;
    sha2::Sha256::digest(bytes).into()
}

/// An Ed25519 private key that signs model artifacts. Secret: `Debug` prints only its id.
pub struct SigningKey {
    pair: Ed25519KeyPair,
    pkcs8: Vec<u8>,
    public: PublicKey,
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SigningKey({}, ...)", self.public.id)
    }
}

impl SigningKey {
    /// A fresh key from the operating system's random source.
    pub fn generate() -> Result<Self, SigningError> {
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
            .map_err(|_| SigningError::Key("key generation failed".into()))?;
        Self::from_pkcs8_der(pkcs8.as_ref())
    }

    /// From PKCS#8 DER, v1 (as `openssl genpkey -algorithm ed25519` writes) or v2 (with the
    /// public key, as [`SigningKey::generate`] writes).
    pub fn from_pkcs8_der(der: &[u8]) -> Result<Self, SigningError> {
        let pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(der)
            .map_err(|e| SigningError::Key(e.to_string()))?;
        let public = PublicKey::from_raw(pair.public_key().as_ref())?;
        Ok(Self {
            pair,
            pkcs8: der.to_vec(),
            public,
        })
    }

    /// From one `PRIVATE KEY` (PKCS#8) PEM block.
    pub fn from_pem(pem: &str) -> Result<Self, SigningError> {
        let der =
            PrivatePkcs8KeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| SigningError::Pem {
                what: "model signing key",
                message: e.to_string(),
            })?;
        Self::from_pkcs8_der(der.secret_pkcs8_der())
    }

    /// PKCS#8 PEM. Secret: write it only with [`crate::files::write_private`] (or
    /// [`SigningKey::save`]).
    pub fn to_pem(&self) -> String {
        pem_block("PRIVATE KEY", &self.pkcs8)
    }

    /// Reads a key written by [`SigningKey::save`] (or openssl).
    pub fn load(path: &Path) -> Result<Self, SigningError> {
        Self::from_pem(&read(path)?)
    }

    /// Writes the key as PKCS#8 PEM, mode 0600, atomically.
    pub fn save(&self, path: &Path) -> Result<(), SigningError> {
        Ok(write_private(path, &self.to_pem())?)
    }

    pub fn public_key(&self) -> &PublicKey {
        &self.public
    }

    pub fn key_id(&self) -> KeyId {
        self.public.id
    }
}

/// What a model signature binds besides the artifact digest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelMetadata<'a> {
    /// The organisation that owns the model (models are per organisation).
    pub org_id: Uuid,
    pub name: &'a str,
    pub version: &'a str,
}

/// A signature with the id of the key that made it.
///
/// Text form (for a `text` column or a JSON string): `ed25519:<key id hex>:<signature hex>`,
/// all lowercase; [`fmt::Display`] writes it and [`FromStr`] parses it strictly.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Signature {
    key_id: KeyId,
    bytes: [u8; SIGNATURE_LEN],
}

impl Signature {
    pub fn key_id(&self) -> KeyId {
        self.key_id
    }

    pub fn bytes(&self) -> &[u8; SIGNATURE_LEN] {
        &self.bytes
    }

    /// From a key id and the 64 signature bytes (e.g. two database columns).
    pub fn from_parts(key_id: KeyId, bytes: &[u8]) -> Result<Self, SigningError> {
        let bytes = bytes.try_into().map_err(|_| {
            SigningError::Malformed(format!(
                "an Ed25519 signature has {SIGNATURE_LEN} bytes, got {}",
                bytes.len()
            ))
        })?;
        Ok(Self { key_id, bytes })
    }
}

impl fmt::Display for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{SIGNATURE_TEXT_PREFIX}:{}:{}",
            self.key_id,
            to_hex(&self.bytes)
        )
    }
}

impl fmt::Debug for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Signature({self})")
    }
}

impl FromStr for Signature {
    type Err = SigningError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut parts = s.split(':');
        let (Some(alg), Some(key), Some(sig), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(SigningError::Malformed(format!(
                "expected {SIGNATURE_TEXT_PREFIX}:<key id>:<signature>"
            )));
        };
        if alg != SIGNATURE_TEXT_PREFIX {
            return Err(SigningError::Malformed(format!(
                "unsupported algorithm {:?}, expected {SIGNATURE_TEXT_PREFIX}",
                truncate(alg)
            )));
        }
        let key_id = key.parse()?;
        let bytes = parse_hex_array(sig).ok_or_else(|| {
            SigningError::Malformed("signature must be 128 lowercase hex digits".into())
        })?;
        Ok(Self { key_id, bytes })
    }
}

/// At most 32 characters of outside text for an error message.
fn truncate(s: &str) -> String {
    s.chars().take(32).collect()
}

fn check_field(field: &'static str, value: &str) -> Result<(), SigningError> {
    if value.is_empty() {
        return Err(field_err(field, "must not be empty"));
    }
    if value.len() > MAX_FIELD_BYTES {
        return Err(field_err(
            field,
            format!(
                "must be at most {MAX_FIELD_BYTES} bytes, got {}",
                value.len()
            ),
        ));
    }
    if value.contains(['\n', '\r', '\0']) {
        return Err(field_err(field, "must not contain line breaks or NUL"));
    }
    Ok(())
}

/// The exact bytes a model signature covers (see the module docs). `sha256_hex` is the
/// artifact's digest: 64 hex digits, either case (it is written lowercase).
pub fn signed_message(meta: &ModelMetadata<'_>, sha256_hex: &str) -> Result<Vec<u8>, SigningError> {
    check_field("name", meta.name)?;
    check_field("version", meta.version)?;
    let digest: [u8; 32] = (sha256_hex.len() == 64)
        .then(|| parse_hex(sha256_hex))
        .flatten()
        .and_then(|d| d.try_into().ok())
        .ok_or_else(|| field_err("sha256", "must be 64 hex digits"))?;
    Ok(format!(
        "{SIGNATURE_DOMAIN}\norg={}\nname={}\nversion={}\nsha256={}\n",
        meta.org_id.hyphenated(),
        meta.name,
        meta.version,
        to_hex(&digest)
    )
    .into_bytes())
}

/// Signs the artifact with digest `sha256_hex` described by `meta`.
pub fn sign_artifact(
    key: &SigningKey,
    sha256_hex: &str,
    meta: &ModelMetadata<'_>,
) -> Result<Signature, SigningError> {
    let msg = signed_message(meta, sha256_hex)?;
    let sig = key.pair.sign(&msg);
    Signature::from_parts(key.key_id(), sig.as_ref())
}

/// Checks `signature` over the artifact with digest `sha256_hex` described by `meta`, with the
/// trusted key the signature names. Returns that key's id.
pub fn verify_artifact(
    trusted_keys: &[PublicKey],
    signature: &Signature,
    sha256_hex: &str,
    meta: &ModelMetadata<'_>,
) -> Result<KeyId, SigningError> {
    if trusted_keys.is_empty() {
        return Err(SigningError::NoTrustedKeys);
    }
    let key = trusted_keys
        .iter()
        .find(|k| k.id == signature.key_id)
        .ok_or(SigningError::UnknownKey(signature.key_id))?;
    let msg = signed_message(meta, sha256_hex)?;
    UnparsedPublicKey::new(&ED25519, &key.raw)
        .verify(&msg, &signature.bytes)
        .map_err(|_| SigningError::BadSignature(key.id))?;
    Ok(key.id)
}

/// File locations of the model signing keys in a directory (usually the CA directory).
///
/// - `model-signing.key` (0600): the key that signs new artifacts.
/// - `model-signing.pub`: its public key.
/// - `model-signing-previous.pub` (during a rotation): the key before, still trusted.
/// - `retired/{unix time}-model-signing-previous.pub`: where [`SigningKeyStore::finish_rotation`]
///   moves it.
#[derive(Debug, Clone)]
pub struct SigningKeyPaths {
    pub key: PathBuf,
    pub public: PathBuf,
    pub previous_public: PathBuf,
    pub retired_dir: PathBuf,
}

impl SigningKeyPaths {
    pub fn new(dir: &Path) -> Self {
        Self {
            key: dir.join("model-signing.key"),
            public: dir.join("model-signing.pub"),
            previous_public: dir.join("model-signing-previous.pub"),
            retired_dir: dir.join("retired"),
        }
    }
}

/// The signing key and the trusted public keys, as the control plane uses them.
///
/// Rotation is two-phase like the CA's: [`SigningKeyStore::rotate`] makes a new signing key
/// and keeps the old public key trusted; the control plane then re-signs every artifact with
/// the new key (only digests are needed) and [`SigningKeyStore::finish_rotation`] retires the
/// old public key. A second rotation before the first is finished is refused.
#[derive(Debug)]
pub struct SigningKeyStore {
    signer: SigningKey,
    previous: Option<PublicKey>,
}

impl SigningKeyStore {
    /// Creates a signing key in `dir`. Refuses to overwrite an existing one.
    pub fn init(dir: &Path) -> Result<Self, SigningError> {
        let p = SigningKeyPaths::new(dir);
        if p.key.exists() {
            return Err(CertError::Exists(p.key).into());
        }
        let key = SigningKey::generate()?;
        // Key first: a crash leaves a key without its .pub (rewritten by `load`), never a
        // published public key whose private key is lost.
        key.save(&p.key)?;
        write_public(&p.public, &key.public_key().to_pem())?;
        Ok(Self {
            signer: key,
            previous: None,
        })
    }

    /// Loads the signing key and, during a rotation, the previous public key. Rewrites
    /// `model-signing.pub` when it is missing or does not match the key (a crash between the
    /// two writes of [`SigningKeyStore::init`] or [`SigningKeyStore::rotate`]).
    pub fn load(dir: &Path) -> Result<Self, SigningError> {
        let p = SigningKeyPaths::new(dir);
        let signer = SigningKey::load(&p.key)?;
        let pem = signer.public_key().to_pem();
        if read(&p.public).ok().as_deref() != Some(pem.as_str()) {
            write_public(&p.public, &pem)?;
        }
        let previous = if p.previous_public.exists() {
            Some(PublicKey::from_pem(&read(&p.previous_public)?)?)
        } else {
            None
        };
        Ok(Self { signer, previous })
    }

    /// Starts a rotation: a new signing key; the current public key stays trusted as
    /// `model-signing-previous.pub`.
    pub fn rotate(dir: &Path) -> Result<Self, SigningError> {
        let p = SigningKeyPaths::new(dir);
        if p.previous_public.exists() {
            return Err(SigningError::Store {
                path: p.previous_public,
                message: "a model signing key rotation is still in progress: re-sign the \
                          artifacts and finish it first"
                    .into(),
            });
        }
        let old = SigningKey::load(&p.key)?;
        let new = SigningKey::generate()?;
        // Trust first, then switch the signer: a reader never sees a signer whose signatures
        // the published key set would refuse.
        write_public(&p.previous_public, &old.public_key().to_pem())?;
        new.save(&p.key)?;
        write_public(&p.public, &new.public_key().to_pem())?;
        Self::load(dir)
    }

    /// Ends a rotation: moves `model-signing-previous.pub` to `retired/`. Signatures by the old
    /// key fail from then on. Returns the moved file, if a rotation was in progress.
    pub fn finish_rotation(dir: &Path, now: SystemTime) -> Result<Option<PathBuf>, SigningError> {
        let p = SigningKeyPaths::new(dir);
        if !p.previous_public.exists() {
            return Ok(None);
        }
        let stamp = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| CertError::Io { path, source }
        };
        {
            use std::os::unix::fs::DirBuilderExt as _;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&p.retired_dir)
                .map_err(io(&p.retired_dir))?;
        }
        let to = p
            .retired_dir
            .join(format!("{stamp}-model-signing-previous.pub"));
        std::fs::rename(&p.previous_public, &to).map_err(io(&p.previous_public))?;
        Ok(Some(to))
    }

    /// The key that signs new artifacts.
    pub fn signer(&self) -> &SigningKey {
        &self.signer
    }

    /// The keys a verifier should trust now: the signer's, then the previous one during a
    /// rotation. This is what the control plane gives agents.
    pub fn trusted(&self) -> Vec<PublicKey> {
        let current = self.signer.public_key();
        std::iter::once(current.clone())
            // Equal only after a crash inside `rotate`; list the key once.
            .chain(self.previous.clone().filter(|p| p != current))
            .collect()
    }

    /// [`SigningKeyStore::trusted`] as concatenated `PUBLIC KEY` PEM blocks (parse with
    /// [`PublicKey::all_from_pem`]).
    pub fn trusted_pem(&self) -> String {
        self.trusted().iter().map(PublicKey::to_pem).collect()
    }

    /// Whether a rotation is in progress.
    pub fn rotation_in_progress(&self) -> bool {
        self.previous.is_some()
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    const SHA: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

    fn meta<'a>(org: Uuid, name: &'a str, version: &'a str) -> ModelMetadata<'a> {
        ModelMetadata {
            org_id: org,
            name,
            version,
        }
    }

    #[test]
    fn a_good_signature_verifies_and_names_its_key() {
        let key = SigningKey::generate().unwrap();
        let org = Uuid::new_v4();
        let m = meta(org, "rul", "3");
        let sig = sign_artifact(&key, SHA, &m).unwrap();
        assert_eq!(sig.key_id(), key.key_id());
        let trusted = [key.public_key().clone()];
        assert_eq!(
            verify_artifact(&trusted, &sig, SHA, &m).unwrap(),
            key.key_id()
        );
        // Uppercase hex names the same digest.
        verify_artifact(&trusted, &sig, &SHA.to_uppercase(), &m).unwrap();
    }

    #[test]
    fn a_signature_does_not_verify_for_another_digest_name_version_or_organisation() {
        let key = SigningKey::generate().unwrap();
        let org = Uuid::new_v4();
        let sig = sign_artifact(&key, SHA, &meta(org, "rul", "3")).unwrap();
        let trusted = [key.public_key().clone()];
        let mut other_sha = SHA.to_owned();
        other_sha.replace_range(0..1, "a");
        for (sha, m) in [
            (other_sha.as_str(), meta(org, "rul", "3")),
            (SHA, meta(org, "rul2", "3")),
            (SHA, meta(org, "rul", "4")),
            (SHA, meta(Uuid::new_v4(), "rul", "3")),
            // Moving a character between fields changes the message.
            (SHA, meta(org, "rul3", "")),
        ] {
            let err = verify_artifact(&trusted, &sig, sha, &m).unwrap_err();
            assert!(
                matches!(
                    err,
                    SigningError::BadSignature(_) | SigningError::Field { .. }
                ),
                "{m:?}: {err}"
            );
        }
        // A flipped signature bit fails too.
        let mut bytes = *sig.bytes();
        bytes[10] ^= 1;
        let flipped = Signature::from_parts(sig.key_id(), &bytes).unwrap();
        assert!(matches!(
            verify_artifact(&trusted, &flipped, SHA, &meta(org, "rul", "3")),
            Err(SigningError::BadSignature(_))
        ));
    }

    #[test]
    fn a_signature_by_an_unknown_key_fails_by_name() {
        let key = SigningKey::generate().unwrap();
        let other = SigningKey::generate().unwrap();
        let m = meta(Uuid::new_v4(), "rul", "1");
        let sig = sign_artifact(&key, SHA, &m).unwrap();
        let err = verify_artifact(&[other.public_key().clone()], &sig, SHA, &m).unwrap_err();
        assert!(matches!(err, SigningError::UnknownKey(id) if id == key.key_id()));
        assert!(err.to_string().contains(&key.key_id().to_string()), "{err}");
        // A signature that claims a trusted key's id but was made by another key.
        let forged = Signature::from_parts(other.key_id(), sig.bytes()).unwrap();
        assert!(matches!(
            verify_artifact(&[other.public_key().clone()], &forged, SHA, &m),
            Err(SigningError::BadSignature(_))
        ));
        assert!(matches!(
            verify_artifact(&[], &sig, SHA, &m),
            Err(SigningError::NoTrustedKeys)
        ));
    }

    #[test]
    fn rotation_trusts_both_keys_during_the_overlap_and_only_the_new_one_after() {
        let dir = tempfile::tempdir().unwrap();
        let m = meta(Uuid::new_v4(), "rul", "1");
        let first = SigningKeyStore::init(dir.path()).unwrap();
        let old_sig = sign_artifact(first.signer(), SHA, &m).unwrap();
        assert!(matches!(
            SigningKeyStore::init(dir.path()),
            Err(SigningError::File(CertError::Exists(_)))
        ));

        let rotated = SigningKeyStore::rotate(dir.path()).unwrap();
        assert!(rotated.rotation_in_progress());
        assert_ne!(rotated.signer().key_id(), first.signer().key_id());
        let new_sig = sign_artifact(rotated.signer(), SHA, &m).unwrap();
        // An agent that received the trusted set over its channel (PEM) verifies both.
        let trusted = PublicKey::all_from_pem(&rotated.trusted_pem()).unwrap();
        assert_eq!(trusted.len(), 2);
        assert_eq!(
            verify_artifact(&trusted, &old_sig, SHA, &m).unwrap(),
            first.signer().key_id()
        );
        assert_eq!(
            verify_artifact(&trusted, &new_sig, SHA, &m).unwrap(),
            rotated.signer().key_id()
        );
        assert!(matches!(
            SigningKeyStore::rotate(dir.path()),
            Err(SigningError::Store { .. })
        ));

        let moved = SigningKeyStore::finish_rotation(dir.path(), SystemTime::now())
            .unwrap()
            .unwrap();
        assert!(moved.starts_with(dir.path().join("retired")));
        let done = SigningKeyStore::load(dir.path()).unwrap();
        assert!(!done.rotation_in_progress());
        let trusted = done.trusted();
        assert_eq!(trusted.len(), 1);
        verify_artifact(&trusted, &new_sig, SHA, &m).unwrap();
        assert!(matches!(
            verify_artifact(&trusted, &old_sig, SHA, &m),
            Err(SigningError::UnknownKey(_))
        ));
        assert_eq!(
            SigningKeyStore::finish_rotation(dir.path(), SystemTime::now()).unwrap(),
            None
        );
    }

    #[test]
    fn keys_are_stored_0600_as_pkcs8_and_load_back() {
        let dir = tempfile::tempdir().unwrap();
        let store = SigningKeyStore::init(dir.path()).unwrap();
        let p = SigningKeyPaths::new(dir.path());
        let mode = std::fs::metadata(&p.key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let pem = std::fs::read_to_string(&p.key).unwrap();
        assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----\n"), "{pem}");
        let loaded = SigningKey::load(&p.key).unwrap();
        assert_eq!(loaded.key_id(), store.signer().key_id());
        let public = PublicKey::from_pem(&std::fs::read_to_string(&p.public).unwrap()).unwrap();
        assert_eq!(&public, store.signer().public_key());
        assert!(!format!("{loaded:?}").contains("PRIVATE"));
        assert!(format!("{loaded:?}").contains(&loaded.key_id().to_string()));
    }

    #[test]
    fn signatures_round_trip_through_their_text_form_and_reject_variants() {
        let key = SigningKey::generate().unwrap();
        let sig = sign_artifact(&key, SHA, &meta(Uuid::nil(), "a", "b")).unwrap();
        let text = sig.to_string();
        assert!(text.starts_with("ed25519:"), "{text}");
        assert_eq!(text.parse::<Signature>().unwrap(), sig);
        for bad in [
            String::new(),
            text.to_uppercase(),
            text.replacen("ed25519", "ecdsa", 1),
            format!("{text}:x"),
            text[..text.len() - 2].to_owned(),
            format!("{text}00"),
            text.replacen(':', ";", 1),
        ] {
            assert!(
                matches!(bad.parse::<Signature>(), Err(SigningError::Malformed(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn fields_that_would_make_the_message_ambiguous_are_refused() {
        let key = SigningKey::generate().unwrap();
        for (name, version, sha) in [
            ("", "1", SHA),
            ("a\nversion=2", "1", SHA),
            ("a", "1\r", SHA),
            ("a\0", "1", SHA),
            ("a", "1", "abc"),
            ("a", "1", &"zz".repeat(32)),
        ] {
            let err = sign_artifact(&key, sha, &meta(Uuid::nil(), name, version)).unwrap_err();
            assert!(matches!(err, SigningError::Field { .. }), "{err}");
        }
        let long = "x".repeat(MAX_FIELD_BYTES + 1);
        let err = sign_artifact(&key, SHA, &meta(Uuid::nil(), &long, "1")).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("name: must be at most {MAX_FIELD_BYTES} bytes, got 257")
        );
    }

    #[test]
    fn the_signed_message_has_the_documented_layout() {
        let org = Uuid::parse_str("2b3c6a2e-0000-4000-8000-000000000001").unwrap();
        let msg = signed_message(&meta(org, "rul", "7"), &SHA.to_uppercase()).unwrap();
        assert_eq!(
            String::from_utf8(msg).unwrap(),
            format!(
                "kip-model-signature-v1\norg=2b3c6a2e-0000-4000-8000-000000000001\nname=rul\n\
                 version=7\nsha256={SHA}\n"
            )
        );
    }

    #[test]
    fn public_keys_accept_only_ed25519_spki() {
        let key = SigningKey::generate().unwrap();
        let der = key.public_key().to_spki_der();
        assert_eq!(PublicKey::from_spki_der(&der).unwrap(), *key.public_key());
        assert!(PublicKey::from_spki_der(&der[..der.len() - 1]).is_err());
        assert!(PublicKey::from_raw(&[0; 31]).is_err());
        let ec = crate::DeviceKey::generate().unwrap();
        let ec_pub = rcgen::KeyPair::from_pem(&ec.to_pem())
            .unwrap()
            .public_key_pem();
        assert!(matches!(
            PublicKey::from_pem(&ec_pub),
            Err(SigningError::PublicKey(_))
        ));
        assert!(PublicKey::all_from_pem("").is_err());
        // A certificate block among keys is skipped; a duplicate key counts once.
        let two = format!(
            "{}{}{}",
            key.public_key().to_pem(),
            crate::cert_to_pem(&rustls::pki_types::CertificateDer::from(vec![0x30, 0])),
            key.public_key().to_pem()
        );
        assert_eq!(PublicKey::all_from_pem(&two).unwrap().len(), 1);
        // An EC private key is not a model signing key.
        assert!(matches!(
            SigningKey::from_pem(&ec.to_pem()),
            Err(SigningError::Key(_))
        ));
    }

    /// Interoperability with the reference implementation: a key made by openssl loads, its
    /// key id is the sha256 of what openssl writes as the public key, and openssl verifies our
    /// signature over the documented message.
    #[test]
    fn openssl_keys_load_and_openssl_verifies_our_signatures() {
        let dir = tempfile::tempdir().unwrap();
        let run = |args: &[&str]| {
            let out = std::process::Command::new("openssl")
                .args(args)
                .current_dir(dir.path())
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            out.stdout
        };
        run(&["genpkey", "-algorithm", "ed25519", "-out", "k.pem"]);
        run(&[
            "pkey", "-in", "k.pem", "-pubout", "-outform", "DER", "-out", "pub.der",
        ]);
        let key = SigningKey::load(&dir.path().join("k.pem")).unwrap();
        let pub_der = std::fs::read(dir.path().join("pub.der")).unwrap();
        assert_eq!(key.key_id().as_bytes(), &sha256(&pub_der));
        let m = meta(Uuid::new_v4(), "rul", "2");
        let sig = sign_artifact(&key, SHA, &m).unwrap();
        std::fs::write(dir.path().join("msg"), signed_message(&m, SHA).unwrap()).unwrap();
        std::fs::write(dir.path().join("sig"), sig.bytes()).unwrap();
        let out = run(&[
            "pkeyutl", "-verify", "-pubin", "-inkey", "pub.der", "-keyform", "DER", "-rawin",
            "-in", "msg", "-sigfile", "sig",
        ]);
        assert!(String::from_utf8_lossy(&out).contains("Verified Successfully"));
    }
}
