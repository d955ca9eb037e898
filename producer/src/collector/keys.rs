//! Write keys: who may post events, as which app, from which web pages, and how fast.
//!
//! Each app (or platform build) has a write key. A request carries it as `Authorization: Bearer
//! <key>`, or, where headers cannot be set (`navigator.sendBeacon`), as the query parameter
//! `?key=<key>`. The collector holds only the SHA-256 digest of each key and looks the digest of
//! the presented key up; keys are never logged.
//!
//! # The keys document
//! A JSON object, read from a file (`--keys-file`) or a Secrets Manager secret's `SecretString`
//! (`--keys-secret`), and read again every `--keys-reload-secs` and on SIGHUP; a document that
//! does not read keeps the keys in force (the error is logged and counted in
//! `collector_keys_reload_errors`).
//!
//! ```json
//! {
//!   "keys": [
//!     {"app_id": "tv-web", "key": "wk_2Jx9...", "origins": ["https://tv.example.com", "https://*.example.com"],
//!      "events_per_second": 500, "burst": 2000},
//!     {"app_id": "tv-roku", "key_sha256": "9f86d081884c7d65...", "events_per_second": 200}
//!   ],
//!   "anonymous": {"app_id": "public-web", "origins": ["*"], "events_per_second": 50}
//! }
//! ```
//!
//! - `app_id`: 1 to 64 characters of `A-Z a-z 0-9 . _ -`; every event the key brings in carries it
//!   (`events.v1.Event.app_id`, replacing whatever the client sent there).
//! - `key` (16 to 256 characters of `A-Z a-z 0-9 . _ ~ -`, safe in a query string) or
//!   `key_sha256` (its SHA-256 as 64 hex digits, so the document need not hold the key itself):
//!   exactly one. Two entries with the same key are an error.
//! - `origins`: the web origins (`scheme://host[:port]`) whose pages may use the key; `*.` at the
//!   start of the host matches any subdomain, and `"*"` any origin. A request that names an
//!   `Origin` the key does not list is answered 403; requests without an `Origin` (apps, servers)
//!   are not checked. Default: none (the key is not for browsers).
//! - `events_per_second` and `burst`: a token bucket per key, counted in events. A request is let
//!   in while the bucket is not empty, and takes as many tokens as it has events (the bucket may go
//!   below zero, so a batch larger than the burst still gets through when the bucket is full);
//!   otherwise it is answered 429 with `Retry-After`. `burst` defaults to one second of the rate.
//!   Without `events_per_second` the key has no limit.
//! - `anonymous`: how requests without any key are taken; without it they are answered 401. It
//!   has no `key`, and its limit is shared by every anonymous caller.
//!
//! Unknown fields are errors (a misspelt `orgins` must not silently allow nothing), and so is a
//! document with neither a key nor `anonymous`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokio::time::Instant;

/// A key's SHA-256.
type KeyDigest = [u8; 32];

/// The keys in force; cheap to clone (every clone sees a [`replace`](Keys::replace)).
#[derive(Debug, Clone)]
pub struct Keys {
    current: Arc<RwLock<Arc<KeySet>>>,
    /// The last reload's error, while the document in the source cannot be used.
    reload_error: Arc<Mutex<Option<String>>>,
}

impl Keys {
    pub fn new(set: KeySet) -> Self {
        Keys { current: Arc::new(RwLock::new(Arc::new(set))), reload_error: Arc::default() }
    }

    /// Why the source's document is not in force (it could not be read or used at the last
    /// reload); `None` once a reload has succeeded or found it unchanged.
    pub fn reload_error(&self) -> Option<String> {
        self.reload_error.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    fn set_reload_error(&self, error: Option<String>) {
        *self.reload_error.lock().unwrap_or_else(PoisonError::into_inner) = error;
    }

    /// Keys read from a keys document (see the module documentation).
    pub fn from_json(document: &str) -> Result<Self, KeysError> {
        KeySet::from_json(document).map(Keys::new)
    }

    /// No keys: every request is taken as `app_id`'s, from any origin, without a limit. For tests
    /// and local tools; a collector on a network should have keys.
    pub fn anonymous(app_id: &str) -> Result<Self, KeysError> {
        let document = serde_json::json!({"anonymous": {"app_id": app_id, "origins": ["*"]}});
        Keys::from_json(&document.to_string())
    }

    /// The set in force now.
    pub fn current(&self) -> Arc<KeySet> {
        Arc::clone(&self.current.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// Puts `set` in force. A key present before and after, with the same limit, keeps its token
    /// bucket (a reload does not hand every key a fresh burst).
    pub fn replace(&self, mut set: KeySet) {
        let old = self.current();
        for (digest, app) in &mut set.by_digest {
            if let Some(before) = old.by_digest.get(digest) {
                app.carry_bucket_from(before);
            }
        }
        if let (Some(app), Some(before)) = (&mut set.anonymous, &old.anonymous) {
            app.carry_bucket_from(before);
        }
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(set);
    }
}

/// One version of the keys document, checked.
#[derive(Debug)]
pub struct KeySet {
    by_digest: HashMap<KeyDigest, Arc<App>>,
    anonymous: Option<Arc<App>>,
    /// Every origin some key (or `anonymous`) allows: what a CORS preflight is answered for.
    any_origins: Origins,
    /// The SHA-256 of the document, to tell a changed document from the same one read again.
    document_digest: KeyDigest,
}

/// What a key lets its caller do.
#[derive(Debug, Clone)]
pub struct App {
    app_id: String,
    origins: Origins,
    limit: Option<Arc<RateLimit>>,
}

impl App {
    /// The app the events are counted to.
    pub fn app_id(&self) -> &str {
        &self.app_id
    }

    /// Whether a page of `origin` may use this key.
    pub fn allows_origin(&self, origin: &str) -> bool {
        self.origins.allows(origin)
    }

    /// Whether the key may send now: `Err(wait)` while its bucket is empty.
    pub(crate) fn check_rate(&self) -> Result<(), Duration> {
        self.limit.as_ref().map_or(Ok(()), |limit| limit.check())
    }

    /// Takes `events` tokens: `Err(wait)` (and nothing taken) while the bucket is empty.
    pub(crate) fn take(&self, events: usize) -> Result<(), Duration> {
        self.limit.as_ref().map_or(Ok(()), |limit| limit.take(events))
    }

    fn carry_bucket_from(self: &mut Arc<Self>, before: &App) {
        if let (Some(limit), Some(old)) = (&self.limit, &before.limit)
            && limit.same_limit(old)
        {
            Arc::make_mut(self).limit = Some(Arc::clone(old));
        }
    }
}

/// Why a request's key was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthError {
    /// No key, and no `anonymous` entry.
    Missing,
    /// A key that is not in the document.
    Unknown,
    /// An `Authorization` header that is not `Bearer <key>`.
    Malformed,
}

impl AuthError {
    pub fn code(self) -> &'static str {
        match self {
            AuthError::Missing => "missing_key",
            AuthError::Unknown => "unknown_key",
            AuthError::Malformed => "bad_authorization",
        }
    }

    pub fn reason(self) -> &'static str {
        match self {
            AuthError::Missing => {
                "this collector needs a write key: send `Authorization: Bearer <key>` or `?key=<key>`"
            }
            AuthError::Unknown => "the write key is not known to this collector",
            AuthError::Malformed => "the Authorization header must be `Bearer <key>`",
        }
    }
}

impl KeySet {
    /// Reads and checks a keys document (see the module documentation).
    pub fn from_json(document: &str) -> Result<Self, KeysError> {
        let parsed: Document =
            serde_json::from_str(document).map_err(|e| KeysError::Invalid(format!("not a keys document: {e}")))?;
        let mut by_digest = HashMap::new();
        let mut any_origins = Origins::default();
        for (index, entry) in parsed.keys.into_iter().enumerate() {
            let at = |reason: String| KeysError::Invalid(format!("keys[{index}]: {reason}"));
            let digest = match (&entry.key, &entry.key_sha256) {
                (Some(key), None) => {
                    check_key(key).map_err(at)?;
                    digest_of(key)
                }
                (None, Some(hex_digest)) => parse_digest(hex_digest).map_err(at)?,
                _ => return Err(at("give exactly one of `key` and `key_sha256`".to_owned())),
            };
            let app = App::from_entry(&entry.app()).map_err(at)?;
            any_origins.extend(&app.origins);
            if by_digest.insert(digest, Arc::new(app)).is_some() {
                return Err(at("the same key is listed twice".to_owned()));
            }
        }
        let anonymous = match parsed.anonymous {
            Some(entry) => {
                let app =
                    App::from_entry(&entry).map_err(|reason| KeysError::Invalid(format!("anonymous: {reason}")))?;
                any_origins.extend(&app.origins);
                Some(Arc::new(app))
            }
            None => None,
        };
        if by_digest.is_empty() && anonymous.is_none() {
            return Err(KeysError::Invalid(
                "the document has no keys and no `anonymous` entry: every request would be refused".to_owned(),
            ));
        }
        Ok(KeySet { by_digest, anonymous, any_origins, document_digest: digest_of(document) })
    }

    /// The app of a request that presented `key` (`None`: no key at all).
    pub fn authenticate(&self, key: Option<&str>) -> Result<Arc<App>, AuthError> {
        match key {
            Some(key) => self.by_digest.get(&digest_of(key)).cloned().ok_or(AuthError::Unknown),
            None => self.anonymous.clone().ok_or(AuthError::Missing),
        }
    }

    /// Whether some key allows pages of `origin` (a CORS preflight is answered for it).
    pub fn some_key_allows_origin(&self, origin: &str) -> bool {
        self.any_origins.allows(origin)
    }

    /// How many keys the document lists (not counting `anonymous`).
    pub fn len(&self) -> usize {
        self.by_digest.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_digest.is_empty()
    }

    pub fn allows_anonymous(&self) -> bool {
        self.anonymous.is_some()
    }

    pub(crate) fn is_same_document(&self, document: &str) -> bool {
        self.document_digest == digest_of(document)
    }
}

/// A keys document that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    /// The document does not read, or breaks a rule (the message says which entry and why).
    #[error("invalid keys document: {0}")]
    Invalid(String),
    #[error("cannot read the keys file {path}: {source}")]
    File { path: PathBuf, source: std::io::Error },
    #[error("cannot read the keys secret {id}: {message}")]
    Secret { id: String, message: String },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Document {
    #[serde(default)]
    keys: Vec<KeyEntry>,
    #[serde(default)]
    anonymous: Option<AppEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyEntry {
    #[serde(default)]
    key: Option<String>,
    #[serde(default)]
    key_sha256: Option<String>,
    app_id: String,
    #[serde(default)]
    origins: Vec<String>,
    #[serde(default)]
    events_per_second: Option<f64>,
    #[serde(default)]
    burst: Option<f64>,
}

/// The `anonymous` entry: a key entry without the key.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AppEntry {
    app_id: String,
    #[serde(default)]
    origins: Vec<String>,
    #[serde(default)]
    events_per_second: Option<f64>,
    #[serde(default)]
    burst: Option<f64>,
}

impl KeyEntry {
    fn app(&self) -> AppEntry {
        AppEntry {
            app_id: self.app_id.clone(),
            origins: self.origins.clone(),
            events_per_second: self.events_per_second,
            burst: self.burst,
        }
    }
}

/// Longest `app_id`.
const MAX_APP_ID_CHARS: usize = 64;
/// Shortest and longest key: shorter keys could be guessed.
const MIN_KEY_CHARS: usize = 16;
const MAX_KEY_CHARS: usize = 256;
/// Highest `events_per_second` and `burst`.
const MAX_RATE: f64 = 1e9;

impl App {
    fn from_entry(entry: &AppEntry) -> Result<App, String> {
        let id = &entry.app_id;
        if id.is_empty()
            || id.chars().count() > MAX_APP_ID_CHARS
            || !id.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        {
            return Err(format!(
                "app_id must be 1 to {MAX_APP_ID_CHARS} characters of A-Z a-z 0-9 . _ - (got {} characters)",
                id.chars().count()
            ));
        }
        let origins = Origins::parse(&entry.origins)?;
        let limit = match (entry.events_per_second, entry.burst) {
            (None, None) => None,
            (None, Some(_)) => return Err("`burst` needs `events_per_second`".to_owned()),
            (Some(rate), burst) => {
                if !(rate > 0.0 && rate <= MAX_RATE) {
                    return Err(format!("events_per_second must be above 0 and at most {MAX_RATE:e} (got {rate})"));
                }
                let burst = burst.unwrap_or(rate.max(1.0));
                if !(1.0..=MAX_RATE).contains(&burst) {
                    return Err(format!("burst must be 1 to {MAX_RATE:e} events (got {burst})"));
                }
                Some(Arc::new(RateLimit::new(rate, burst)))
            }
        };
        Ok(App { app_id: id.clone(), origins, limit })
    }
}

fn check_key(key: &str) -> Result<(), String> {
    let chars = key.chars().count();
    if !(MIN_KEY_CHARS..=MAX_KEY_CHARS).contains(&chars) {
        return Err(format!("a key must be {MIN_KEY_CHARS} to {MAX_KEY_CHARS} characters long (got {chars})"));
    }
    if !key.chars().all(is_key_char) {
        return Err("a key may hold only A-Z a-z 0-9 . _ ~ - (characters safe in a query string)".to_owned());
    }
    Ok(())
}

/// The characters a key may hold: URL-unreserved, so `?key=` needs no escaping.
pub(crate) fn is_key_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '~' | '-')
}

fn parse_digest(text: &str) -> Result<KeyDigest, String> {
    let mut digest = [0u8; 32];
    hex::decode_to_slice(text.trim(), &mut digest)
        .map_err(|_| "key_sha256 must be 64 hexadecimal digits (the SHA-256 of the key)".to_owned())?;
    Ok(digest)
}

fn digest_of(text: &str) -> KeyDigest {
    Sha256::digest(text.as_bytes()).into()
}

/// The SHA-256 of `key` as 64 lowercase hex digits: what `key_sha256` holds.
pub fn key_sha256(key: &str) -> String {
    hex::encode(digest_of(key))
}

/// A list of web origins.
#[derive(Debug, Clone, Default)]
struct Origins {
    any: bool,
    /// `scheme://host[:port]`, lowercase.
    exact: Vec<String>,
    /// (`scheme://`, `.suffix[:port]`) for `scheme://*.suffix[:port]`.
    subdomains: Vec<(String, String)>,
}

impl Origins {
    fn parse(patterns: &[String]) -> Result<Origins, String> {
        let mut origins = Origins::default();
        for pattern in patterns {
            let bad = |why: &str| format!("origin {pattern:?} {why}; write scheme://host[:port], *.host, or *");
            if pattern == "*" {
                origins.any = true;
                continue;
            }
            let lower = pattern.to_ascii_lowercase();
            let Some((scheme, rest)) = lower.split_once("://") else { return Err(bad("has no scheme")) };
            if !matches!(scheme, "http" | "https") {
                return Err(bad("is not http or https"));
            }
            if rest.is_empty() || rest.contains(['/', '?', '#', '@', ' ']) {
                return Err(bad("is not just a host and port"));
            }
            match rest.strip_prefix("*.") {
                Some(suffix) if !suffix.is_empty() && !suffix.contains('*') => {
                    origins.subdomains.push((format!("{scheme}://"), format!(".{suffix}")));
                }
                Some(_) => return Err(bad("has an empty or second wildcard")),
                None if rest.contains('*') => return Err(bad("has a wildcard that is not a leading `*.`")),
                None => origins.exact.push(lower),
            }
        }
        Ok(origins)
    }

    fn extend(&mut self, other: &Origins) {
        self.any |= other.any;
        self.exact.extend(other.exact.iter().cloned());
        self.subdomains.extend(other.subdomains.iter().cloned());
    }

    fn allows(&self, origin: &str) -> bool {
        if self.any {
            return true;
        }
        let origin = origin.to_ascii_lowercase();
        self.exact.contains(&origin)
            || self.subdomains.iter().any(|(scheme, suffix)| {
                origin.strip_prefix(scheme.as_str()).is_some_and(|host| {
                    host.len() > suffix.len() && host.ends_with(suffix.as_str()) && !host.contains('/')
                })
            })
    }
}

/// A token bucket counted in events, allowed to go below zero (see the module documentation).
#[derive(Debug)]
pub(crate) struct RateLimit {
    rate: f64,
    burst: f64,
    bucket: Mutex<Bucket>,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl RateLimit {
    fn new(rate: f64, burst: f64) -> Self {
        RateLimit { rate, burst, bucket: Mutex::new(Bucket { tokens: burst, at: Instant::now() }) }
    }

    fn same_limit(&self, other: &RateLimit) -> bool {
        self.rate.to_bits() == other.rate.to_bits() && self.burst.to_bits() == other.burst.to_bits()
    }

    /// The bucket, refilled to now.
    fn refilled(&self) -> std::sync::MutexGuard<'_, Bucket> {
        let mut bucket = self.bucket.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        let elapsed = now.duration_since(bucket.at).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * self.rate).min(self.burst);
        bucket.at = now;
        bucket
    }

    /// How long until the bucket holds a token again.
    fn wait(&self, tokens: f64) -> Duration {
        Duration::from_secs_f64(((1.0 - tokens) / self.rate).clamp(0.0, 86_400.0))
    }

    fn check(&self) -> Result<(), Duration> {
        let bucket = self.refilled();
        if bucket.tokens > 0.0 { Ok(()) } else { Err(self.wait(bucket.tokens)) }
    }

    fn take(&self, events: usize) -> Result<(), Duration> {
        let mut bucket = self.refilled();
        if bucket.tokens > 0.0 {
            bucket.tokens -= events as f64;
            Ok(())
        } else {
            Err(self.wait(bucket.tokens))
        }
    }
}

/// Where the keys document comes from.
#[derive(Debug, Clone)]
pub enum KeySource {
    /// A file (in a container: a mounted volume or a file written by a sidecar).
    File(PathBuf),
    /// A Secrets Manager secret (name or ARN) whose `SecretString` is the document.
    Secret { id: String, client: aws_sdk_secretsmanager::Client },
}

impl KeySource {
    /// What the source is, for logs (never the keys).
    pub fn describe(&self) -> String {
        match self {
            KeySource::File(path) => format!("file {}", path.display()),
            KeySource::Secret { id, .. } => format!("secret {id}"),
        }
    }

    /// Reads the document as it is now.
    pub async fn read(&self) -> Result<String, KeysError> {
        match self {
            KeySource::File(path) => {
                tokio::fs::read_to_string(path).await.map_err(|source| KeysError::File { path: path.clone(), source })
            }
            KeySource::Secret { id, client } => {
                let secret = |message: String| KeysError::Secret { id: id.clone(), message };
                let value = client
                    .get_secret_value()
                    .secret_id(id)
                    .send()
                    .await
                    .map_err(|e| secret(aws_sdk_secretsmanager::error::DisplayErrorContext(e).to_string()))?;
                value.secret_string.ok_or_else(|| secret("the secret has no SecretString".to_owned()))
            }
        }
    }

    /// Reads and checks the document.
    pub async fn load(&self) -> Result<KeySet, KeysError> {
        KeySet::from_json(&self.read().await?)
    }
}

/// Reads `source` again every `every` and whenever `now` is notified (SIGHUP, in the binary),
/// and puts a changed document in force. A document that cannot be read or used leaves the
/// keys in force, with an error in the log (at most one a minute) and
/// `collector_keys_reload_errors` counted. Runs until dropped.
pub async fn keep_loading(source: KeySource, keys: Keys, every: Duration, now: Arc<tokio::sync::Notify>) {
    let errors = super::log_limit::LogLimit::new(Duration::from_secs(60));
    let mut ticks = tokio::time::interval_at(Instant::now() + every, every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            () = now.notified() => {}
        }
        let loaded = match source.read().await {
            Ok(document) if keys.current().is_same_document(&document) => {
                keys.set_reload_error(None);
                continue;
            }
            Ok(document) => KeySet::from_json(&document),
            Err(e) => Err(e),
        };
        match loaded {
            Ok(set) => {
                let (count, anonymous) = (set.len(), set.allows_anonymous());
                keys.replace(set);
                keys.set_reload_error(None);
                metrics::counter!("collector_keys_reloads").increment(1);
                metrics::gauge!("collector_keys").set(count as f64);
                tracing::info!(source = %source.describe(), keys = count, anonymous, "write keys reloaded");
            }
            Err(e) => {
                metrics::counter!("collector_keys_reload_errors").increment(1);
                keys.set_reload_error(Some(e.to_string()));
                if let Some(suppressed) = errors.admit() {
                    tracing::error!(suppressed, "write keys not reloaded; the keys in force stay: {e}");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WEB_KEY: &str = "wk_web_0123456789abcdef";
    const ROKU_KEY: &str = "wk_roku_0123456789abcdef";

    fn set(document: serde_json::Value) -> Result<KeySet, KeysError> {
        KeySet::from_json(&document.to_string())
    }

    fn message(document: serde_json::Value) -> String {
        set(document).expect_err("invalid").to_string()
    }

    #[test]
    fn a_key_names_its_app_and_an_unknown_or_missing_one_is_refused() {
        let keys = set(serde_json::json!({"keys": [
            {"app_id": "tv-web", "key": WEB_KEY},
            {"app_id": "tv-roku", "key_sha256": key_sha256(ROKU_KEY)},
        ]}))
        .expect("valid");
        assert_eq!(keys.authenticate(Some(WEB_KEY)).expect("known").app_id(), "tv-web");
        assert_eq!(keys.authenticate(Some(ROKU_KEY)).expect("known by digest").app_id(), "tv-roku");
        assert_eq!(keys.authenticate(Some("wk_web_0123456789abcdeF")).err(), Some(AuthError::Unknown));
        assert_eq!(keys.authenticate(None).err(), Some(AuthError::Missing));
        assert_eq!(keys.len(), 2);
        assert!(!keys.allows_anonymous());
    }

    #[test]
    fn anonymous_callers_are_taken_only_when_the_document_says_so() {
        let keys = set(serde_json::json!({"keys": [{"app_id": "tv-web", "key": WEB_KEY}],
                                          "anonymous": {"app_id": "public"}}))
        .expect("valid");
        assert_eq!(keys.authenticate(None).expect("anonymous").app_id(), "public");
        // A wrong key is an error, not a quiet fall-back to anonymous.
        assert_eq!(keys.authenticate(Some("not-a-key-but-long-enough")).err(), Some(AuthError::Unknown));
    }

    #[test]
    fn bad_documents_say_which_entry_and_why() {
        let cases = [
            (serde_json::json!({}), "no keys and no `anonymous`"),
            (serde_json::json!({"keys": [{"app_id": "a", "key": "short"}]}), "keys[0]: a key must be 16"),
            (
                serde_json::json!({"keys": [{"app_id": "a", "key": "has spaces in it, sadly"}]}),
                "keys[0]: a key may hold only",
            ),
            (serde_json::json!({"keys": [{"app_id": "a"}]}), "keys[0]: give exactly one"),
            (
                serde_json::json!({"keys": [{"app_id": "a", "key": WEB_KEY, "key_sha256": key_sha256(WEB_KEY)}]}),
                "exactly one",
            ),
            (serde_json::json!({"keys": [{"app_id": "a", "key_sha256": "abc"}]}), "64 hexadecimal"),
            (serde_json::json!({"keys": [{"app_id": "", "key": WEB_KEY}]}), "app_id must be"),
            (serde_json::json!({"keys": [{"app_id": "tv web", "key": WEB_KEY}]}), "app_id must be"),
            (
                serde_json::json!({"keys": [{"app_id": "a", "key": WEB_KEY}, {"app_id": "b", "key_sha256": key_sha256(WEB_KEY)}]}),
                "keys[1]: the same key is listed twice",
            ),
            (serde_json::json!({"keys": [{"app_id": "a", "key": WEB_KEY, "orgins": ["*"]}]}), "unknown field"),
            (serde_json::json!({"keyz": []}), "unknown field"),
            (
                serde_json::json!({"keys": [{"app_id": "a", "key": WEB_KEY, "origins": ["tv.example.com"]}]}),
                "has no scheme",
            ),
            (
                serde_json::json!({"keys": [{"app_id": "a", "key": WEB_KEY, "origins": ["ftp://x.com"]}]}),
                "not http or https",
            ),
            (
                serde_json::json!({"keys": [{"app_id": "a", "key": WEB_KEY, "origins": ["https://x.com/path"]}]}),
                "not just a host",
            ),
            (
                serde_json::json!({"keys": [{"app_id": "a", "key": WEB_KEY, "origins": ["https://a.*.com"]}]}),
                "wildcard",
            ),
            (
                serde_json::json!({"keys": [{"app_id": "a", "key": WEB_KEY, "events_per_second": 0}]}),
                "events_per_second must be above 0",
            ),
            (
                serde_json::json!({"keys": [{"app_id": "a", "key": WEB_KEY, "events_per_second": 10, "burst": 0.5}]}),
                "burst must be",
            ),
            (serde_json::json!({"keys": [{"app_id": "a", "key": WEB_KEY, "burst": 10}]}), "`burst` needs"),
            (serde_json::json!({"anonymous": {"app_id": "a", "key": WEB_KEY}}), "unknown field"),
        ];
        for (document, expected) in cases {
            let got = message(document.clone());
            assert!(got.contains(expected), "{document}: {got}");
            assert!(!got.contains(WEB_KEY), "a key is never in a message: {got}");
        }
        assert!(KeySet::from_json("{not json").expect_err("not JSON").to_string().contains("not a keys document"));
    }

    #[test]
    fn origins_match_exactly_by_subdomain_or_all() {
        let keys = set(serde_json::json!({"keys": [
            {"app_id": "tv-web", "key": WEB_KEY, "origins": ["https://tv.example.com", "https://*.example.org", "http://localhost:3000"]},
            {"app_id": "tv-roku", "key": ROKU_KEY},
        ]}))
        .expect("valid");
        let web = keys.authenticate(Some(WEB_KEY)).expect("known");
        for allowed in [
            "https://tv.example.com",
            "HTTPS://TV.Example.com",
            "https://www.example.org",
            "https://a.b.example.org",
            "http://localhost:3000",
        ] {
            assert!(web.allows_origin(allowed), "{allowed}");
            assert!(keys.some_key_allows_origin(allowed), "{allowed}");
        }
        for refused in [
            "http://tv.example.com",
            "https://tv.example.com:8443",
            "https://example.org",
            "https://evilexample.org",
            "https://example.org.evil.com",
            "http://localhost:3001",
            "null",
        ] {
            assert!(!web.allows_origin(refused), "{refused}");
            assert!(!keys.some_key_allows_origin(refused), "{refused}");
        }
        let roku = keys.authenticate(Some(ROKU_KEY)).expect("known");
        assert!(!roku.allows_origin("https://tv.example.com"), "a key without origins is not for browsers");
        let open = set(serde_json::json!({"anonymous": {"app_id": "p", "origins": ["*"]}})).expect("valid");
        assert!(open.some_key_allows_origin("https://anything.example"));
    }

    #[tokio::test(start_paused = true)]
    async fn the_bucket_lets_a_batch_in_while_not_empty_and_says_how_long_to_wait() {
        let keys =
            set(serde_json::json!({"keys": [{"app_id": "a", "key": WEB_KEY, "events_per_second": 100, "burst": 200}]}))
                .expect("valid");
        let app = keys.authenticate(Some(WEB_KEY)).expect("known");
        assert_eq!(app.take(150), Ok(()));
        assert_eq!(app.take(150), Ok(()), "50 tokens left: a batch of 150 still gets in");
        // -100 tokens now: 1.01 s until one token is back.
        let wait = app.check_rate().expect_err("empty");
        assert!(wait > Duration::from_millis(1000) && wait <= Duration::from_millis(1011), "{wait:?}");
        assert_eq!(app.take(1), Err(wait), "nothing is taken while empty");
        tokio::time::advance(Duration::from_millis(1020)).await;
        assert_eq!(app.check_rate(), Ok(()));
        // Never more than the burst, however long it rests.
        tokio::time::advance(Duration::from_secs(3600)).await;
        assert_eq!(app.take(200), Ok(()));
        assert!(app.check_rate().is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn a_reload_keeps_the_buckets_of_unchanged_keys() {
        let document = |rate: u32| {
            serde_json::json!({"keys": [
                {"app_id": "a", "key": WEB_KEY, "events_per_second": rate},
                {"app_id": "b", "key": ROKU_KEY, "events_per_second": 10},
            ]})
        };
        let keys = Keys::new(set(document(10)).expect("valid"));
        let app = |keys: &Keys, key| keys.current().authenticate(Some(key)).expect("known");
        app(&keys, WEB_KEY).take(10).expect("full");
        app(&keys, ROKU_KEY).take(10).expect("full");
        keys.replace(set(document(10)).expect("valid"));
        assert!(app(&keys, WEB_KEY).check_rate().is_err(), "same key, same limit: still empty");
        keys.replace(set(document(20)).expect("valid"));
        assert!(app(&keys, WEB_KEY).check_rate().is_ok(), "a new limit starts full");
        assert!(app(&keys, ROKU_KEY).check_rate().is_err(), "the other key's bucket is untouched");
    }

    #[test]
    fn the_same_document_is_recognised() {
        let document = serde_json::json!({"anonymous": {"app_id": "p"}}).to_string();
        let keys = KeySet::from_json(&document).expect("valid");
        assert!(keys.is_same_document(&document));
        assert!(!keys.is_same_document(&format!("{document} ")));
    }

    #[tokio::test]
    async fn a_file_source_reads_and_reports_a_missing_file() {
        let dir = std::env::temp_dir().join(format!("ktk-keys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("keys.json");
        std::fs::write(&path, serde_json::json!({"keys": [{"app_id": "a", "key": WEB_KEY}]}).to_string())
            .expect("write");
        let loaded = KeySource::File(path.clone()).load().await.expect("loads");
        assert_eq!(loaded.len(), 1);
        let missing = KeySource::File(dir.join("nope.json")).load().await.expect_err("missing");
        assert!(matches!(missing, KeysError::File { .. }), "{missing}");
        assert!(missing.to_string().contains("nope.json"), "{missing}");
        std::fs::remove_dir_all(&dir).expect("clean up");
    }

    #[tokio::test]
    async fn keep_loading_puts_a_changed_document_in_force_and_keeps_the_old_one_on_error() {
        let dir = std::env::temp_dir().join(format!("ktk-keys-reload-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("keys.json");
        let write = |document: &str| std::fs::write(&path, document).expect("write");
        write(&serde_json::json!({"keys": [{"app_id": "a", "key": WEB_KEY}]}).to_string());
        let source = KeySource::File(path.clone());
        let keys = Keys::new(source.load().await.expect("loads"));
        let now = Arc::new(tokio::sync::Notify::new());
        let task = tokio::spawn(keep_loading(source, keys.clone(), Duration::from_secs(3600), Arc::clone(&now)));
        let until = |done: &dyn Fn() -> bool| {
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while !done() && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
        };

        write(&serde_json::json!({"keys": [{"app_id": "b", "key": ROKU_KEY}]}).to_string());
        now.notify_one();
        let keys_in_task = keys.clone();
        tokio::task::spawn_blocking(move || until(&|| keys_in_task.current().authenticate(Some(ROKU_KEY)).is_ok()))
            .await
            .expect("waits");
        assert!(keys.current().authenticate(Some(ROKU_KEY)).is_ok(), "reloaded on notify");
        assert_eq!(keys.current().authenticate(Some(WEB_KEY)).err(), Some(AuthError::Unknown));
        assert_eq!(keys.reload_error(), None);

        write("{ broken");
        now.notify_one();
        let keys_in_task = keys.clone();
        tokio::task::spawn_blocking(move || until(&|| keys_in_task.reload_error().is_some())).await.expect("waits");
        let error = keys.reload_error().expect("the broken document is reported");
        assert!(error.contains("not a keys document"), "{error}");
        assert!(keys.current().authenticate(Some(ROKU_KEY)).is_ok(), "a broken document leaves the keys in force");
        task.abort();
        std::fs::remove_dir_all(&dir).expect("clean up");
    }
}
