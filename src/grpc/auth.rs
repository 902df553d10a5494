//! Backend credentials: the tokens file, the roles it grants, and the check on every gRPC call.
//!
//! `--grpc-tokens-file` holds one credential per line, `ROLE TOKEN [ENTITIES]`
//! (`#` starts a comment). ROLE is `notifier` (may call `Notify` for keys
//! of the ENTITIES it lists) or `resolver` (may open `Resolve` streams for
//! the ENTITIES it lists); ENTITIES are comma-separated, `*` — the default —
//! for all. Calls carry `authorization: Bearer TOKEN`.
//!
//! Tokens are never kept or compared as they are: each is hashed (SHA-256)
//! when the file is read, a presented token is hashed the same way, and the
//! digests are compared in constant time against every credential (no early
//! exit), so neither timing nor memory dumps of the set give a token away.
//! Logs name a credential by `token.id`, the first 8 bytes of its digest in
//! hex, which identifies it without revealing it.

use std::{
    collections::{BTreeSet, HashSet},
    path::{Path, PathBuf},
    sync::Arc,
};

use ring::digest::{SHA256, digest};
use subtle::ConstantTimeEq;
use tokio::sync::watch;
use tonic::{Status, codegen::http::HeaderMap, metadata::MetadataMap};

/// Shortest token accepted: shorter ones are guessable.
pub const MIN_TOKEN_BYTES: usize = 16;
/// Most entities one resolver line may list.
pub const MAX_ENTITIES_PER_TOKEN: usize = 1024;

/// What a credential may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    Notifier,
    Resolver,
}

impl Role {
    fn as_str(self) -> &'static str {
        match self {
            Role::Notifier => "notifier",
            Role::Resolver => "resolver",
        }
    }
}

/// The entities a credential may register (resolver) or notify (notifier).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Entities {
    All,
    Only(BTreeSet<String>),
}

impl Entities {
    pub(crate) fn allows(&self, entity: &str) -> bool {
        match self {
            Entities::All => true,
            Entities::Only(set) => set.contains(entity),
        }
    }
}

/// One line of the tokens file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Credential {
    digest: [u8; 32],
    /// Names the credential in logs and scopes its idempotency keys.
    pub(crate) id: String,
    pub(crate) role: Role,
    pub(crate) entities: Entities,
}

impl Credential {
    /// Whether this credential still exists, with at least these rights, in `set`.
    pub(crate) fn still_in(&self, set: &TokenSet) -> bool {
        set.credentials.iter().any(|c| c == self)
    }
}

/// Why a tokens file was refused. Messages name lines, never tokens.
#[derive(Debug, thiserror::Error)]
pub enum TokensFileError {
    #[error("cannot read the tokens file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("tokens file {path}, line {line}: {reason}")]
    Line {
        path: PathBuf,
        line: usize,
        reason: String,
    },
}

/// The credentials of one reading of the file.
#[derive(Debug, Default)]
pub(crate) struct TokenSet {
    credentials: Vec<Credential>,
}

impl TokenSet {
    /// Parses the file's text; `path` only names it in errors.
    pub(crate) fn parse(path: &Path, text: &str) -> Result<TokenSet, TokensFileError> {
        let mut credentials: Vec<Credential> = Vec::new();
        let mut seen = HashSet::new();
        for (index, raw) in text.lines().enumerate() {
            let line = index + 1;
            let refuse = |reason: &str| TokensFileError::Line {
                path: path.to_owned(),
                line,
                reason: reason.to_owned(),
            };
            let content = raw.split('#').next().unwrap_or("");
            let mut fields = content.split_whitespace();
            let Some(role) = fields.next() else {
                continue;
            };
            let role = match role {
                "notifier" => Role::Notifier,
                "resolver" => Role::Resolver,
                _ => return Err(refuse("the role must be `notifier` or `resolver`")),
            };
            let token = fields
                .next()
                .ok_or_else(|| refuse("a token must follow the role"))?;
            if token.len() < MIN_TOKEN_BYTES {
                return Err(refuse(&format!(
                    "the token is shorter than {MIN_TOKEN_BYTES} bytes"
                )));
            }
            let entities = match fields.next() {
                None | Some("*") => Entities::All,
                Some(list) => {
                    let set: BTreeSet<String> = list
                        .split(',')
                        .map(str::trim)
                        .filter(|e| !e.is_empty())
                        .map(str::to_owned)
                        .collect();
                    if set.is_empty() {
                        return Err(refuse("the entity list is empty"));
                    }
                    if set.len() > MAX_ENTITIES_PER_TOKEN {
                        return Err(refuse(&format!(
                            "more than {MAX_ENTITIES_PER_TOKEN} entities"
                        )));
                    }
                    if set.contains("*") {
                        return Err(refuse("`*` stands alone: it already means every entity"));
                    }
                    Entities::Only(set)
                }
            };
            if fields.next().is_some() {
                return Err(refuse(
                    "too many fields: expected ROLE TOKEN [ENTITIES] (entities comma-separated, no spaces)",
                ));
            }
            let digest = hash(token);
            if !seen.insert(digest) {
                return Err(refuse("this token is already on an earlier line"));
            }
            credentials.push(Credential {
                digest,
                id: fingerprint(&digest),
                role,
                entities,
            });
        }
        Ok(TokenSet { credentials })
    }

    /// Reads and parses `path`.
    pub(crate) fn load(path: &Path) -> Result<TokenSet, TokensFileError> {
        let text = std::fs::read_to_string(path).map_err(|source| TokensFileError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(path, &text)
    }

    pub(crate) fn len(&self) -> usize {
        self.credentials.len()
    }

    /// The credential whose token is `token`, comparing against every one
    /// in constant time.
    fn find(&self, token: &str) -> Option<&Credential> {
        let presented = hash(token);
        let mut found = None;
        for credential in &self.credentials {
            if bool::from(credential.digest.ct_eq(&presented)) {
                found = Some(credential);
            }
        }
        found
    }
}

fn hash(token: &str) -> [u8; 32] {
    hash_bytes(token.as_bytes())
}

fn hash_bytes(bytes: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(digest(&SHA256, bytes).as_ref());
    out
}

fn fingerprint(digest: &[u8; 32]) -> String {
    digest[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// The node's credential check: a cheap-clone handle. Without a tokens
/// file every call is allowed (the gRPC port is loopback-only, guarded by
/// client certificates, or explicitly `--grpc-insecure`).
#[derive(Clone)]
pub(crate) struct Auth {
    source: Option<Arc<Source>>,
}

struct Source {
    path: PathBuf,
    current: watch::Sender<Arc<TokenSet>>,
}

/// What a caller presented and was granted.
pub(crate) type Granted = Option<Credential>;

impl Auth {
    /// No tokens file: every call is allowed.
    pub(crate) fn open() -> Self {
        Auth { source: None }
    }

    /// Reads `path` now; [`reload`](Self::reload) reads it again.
    pub(crate) fn from_file(path: &Path) -> Result<Self, TokensFileError> {
        let set = TokenSet::load(path)?;
        if set.len() == 0 {
            tracing::warn!(path = %path.display(), "the tokens file holds no token: every Notify and Resolve call will be refused");
        }
        Ok(Auth {
            source: Some(Arc::new(Source {
                path: path.to_owned(),
                current: watch::Sender::new(Arc::new(set)),
            })),
        })
    }

    /// Whether calls need a token.
    pub(crate) fn enabled(&self) -> bool {
        self.source.is_some()
    }

    /// Reads the file again. A file that does not parse leaves the current
    /// credentials in force. Returns how many credentials are in force.
    pub(crate) fn reload(&self) -> Result<usize, TokensFileError> {
        let Some(source) = &self.source else {
            return Ok(0);
        };
        let set = TokenSet::load(&source.path)?;
        let count = set.len();
        source.current.send_replace(Arc::new(set));
        tracing::info!(path = %source.path.display(), credentials = count, "tokens file reloaded");
        Ok(count)
    }

    /// Follows reloads (streams re-check their credential on each).
    pub(crate) fn watch(&self) -> Option<watch::Receiver<Arc<TokenSet>>> {
        self.source.as_ref().map(|s| s.current.subscribe())
    }

    /// Checks the call's bearer token for `role`: UNAUTHENTICATED without a
    /// known token, PERMISSION_DENIED for a token of the other role.
    pub(crate) fn check(&self, metadata: &MetadataMap, role: Role) -> Result<Granted, Status> {
        self.check_headers(metadata.as_ref(), role)
    }

    /// [`check`](Self::check) on a request's HTTP headers (the gRPC port's
    /// gate, before any of the body is read).
    pub(crate) fn check_headers(&self, headers: &HeaderMap, role: Role) -> Result<Granted, Status> {
        let Some(source) = &self.source else {
            return Ok(None);
        };
        let token = bearer(headers).ok_or_else(|| {
            Status::unauthenticated("missing bearer token: send `authorization: Bearer TOKEN`")
        })?;
        let set = source.current.borrow().clone();
        let Some(credential) = set.find(token) else {
            return Err(Status::unauthenticated("unknown bearer token"));
        };
        if credential.role != role {
            tracing::info!(token.id = %credential.id, role = credential.role.as_str(), wanted = role.as_str(), "call refused: token of the other role");
            return Err(Status::permission_denied(format!(
                "this token has the {} role; this call needs a {} token",
                credential.role.as_str(),
                role.as_str()
            )));
        }
        Ok(Some(credential.clone()))
    }
}

/// The token of `authorization: Bearer TOKEN`, if well-formed.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get("authorization")?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// Names a client certificate (`der`) the way `token.id` names a token:
/// the first 8 bytes of its SHA-256, in hex.
pub(crate) fn certificate_id(der: &[u8]) -> String {
    fingerprint(&hash_bytes(der))
}

/// The idempotency key as the bus sees it: scoped to the credential, so one
/// notifier cannot make another's change a duplicate by sending its key first.
/// With no token (client certificates only), the caller's certificate
/// (`peer_cert`, DER) scopes the key the same way.
pub(crate) fn scoped_idempotency_key(
    granted: &Granted,
    peer_cert: Option<&[u8]>,
    key: &str,
) -> String {
    if key.is_empty() {
        return String::new();
    }
    match (granted, peer_cert) {
        (Some(credential), _) => format!("{}:{key}", credential.id),
        (None, Some(cert)) => format!("{}:{key}", certificate_id(cert)),
        (None, None) => key.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "\
# backends of the grocery app
notifier  n-0123456789abcdef
resolver  r-0123456789abcdef  items,lists   # the grocery backend
resolver  a-0123456789abcdef  *
resolver  b-0123456789abcdef
notifier  s-0123456789abcdef  items   # notifies items only
";

    fn set() -> TokenSet {
        TokenSet::parse(Path::new("tokens"), FILE).unwrap()
    }

    fn metadata(value: &str) -> MetadataMap {
        let mut m = MetadataMap::new();
        m.insert("authorization", value.parse().unwrap());
        m
    }

    #[test]
    fn parses_roles_entities_and_comments() {
        let set = set();
        assert_eq!(set.len(), 5);
        let notifier = set.find("n-0123456789abcdef").unwrap();
        assert_eq!(
            (notifier.role, &notifier.entities),
            (Role::Notifier, &Entities::All)
        );
        let resolver = set.find("r-0123456789abcdef").unwrap();
        assert!(resolver.entities.allows("items") && resolver.entities.allows("lists"));
        assert!(!resolver.entities.allows("docs"));
        assert_eq!(
            set.find("a-0123456789abcdef").unwrap().entities,
            Entities::All
        );
        assert_eq!(
            set.find("b-0123456789abcdef").unwrap().entities,
            Entities::All
        );
        assert!(set.find("n-0123456789abcdeX").is_none());
        let scoped = set.find("s-0123456789abcdef").unwrap();
        assert_eq!(scoped.role, Role::Notifier);
        assert!(scoped.entities.allows("items") && !scoped.entities.allows("lists"));
        assert_eq!(notifier.id.len(), 16);
    }

    #[test]
    fn bad_lines_are_refused_by_number_without_the_token() {
        let cases = [
            ("admin abcdefghijklmnopqrstu", 1, "role"),
            ("notifier", 1, "token must follow"),
            ("notifier short", 1, "shorter than 16"),
            ("resolver abcdefghijklmnopqrstu a b", 1, "too many fields"),
            ("resolver abcdefghijklmnopqrstu *,items", 1, "stands alone"),
            (
                "notifier abcdefghijklmnopqrstu\nresolver abcdefghijklmnopqrstu",
                2,
                "already on an earlier line",
            ),
        ];
        for (text, line, reason) in cases {
            let err = TokenSet::parse(Path::new("t"), text).unwrap_err();
            let message = err.to_string();
            assert!(message.contains(&format!("line {line}")), "{message}");
            assert!(message.contains(reason), "{message}");
            assert!(!message.contains("abcdefghijklmnopqrstu"), "{message}");
            assert!(!message.contains("short "), "{message}");
        }
    }

    #[test]
    fn checks_token_and_role() {
        let auth = Auth {
            source: Some(Arc::new(Source {
                path: "t".into(),
                current: watch::Sender::new(Arc::new(set())),
            })),
        };
        let code = |m: &MetadataMap, role| auth.check(m, role).map(|_| ()).map_err(|s| s.code());
        assert_eq!(
            code(&MetadataMap::new(), Role::Notifier),
            Err(tonic::Code::Unauthenticated)
        );
        assert_eq!(
            code(&metadata("Bearer nope-nope-nope-nope"), Role::Notifier),
            Err(tonic::Code::Unauthenticated)
        );
        assert_eq!(
            code(&metadata("Basic n-0123456789abcdef"), Role::Notifier),
            Err(tonic::Code::Unauthenticated)
        );
        assert_eq!(
            code(&metadata("Bearer n-0123456789abcdef"), Role::Notifier),
            Ok(())
        );
        assert_eq!(
            code(&metadata("bearer n-0123456789abcdef"), Role::Notifier),
            Ok(())
        );
        assert_eq!(
            code(&metadata("Bearer n-0123456789abcdef"), Role::Resolver),
            Err(tonic::Code::PermissionDenied)
        );
        assert_eq!(
            code(&metadata("Bearer r-0123456789abcdef"), Role::Notifier),
            Err(tonic::Code::PermissionDenied)
        );
        assert!(
            Auth::open()
                .check(&MetadataMap::new(), Role::Resolver)
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn idempotency_keys_are_scoped_to_the_credential() {
        let set = set();
        let a = Some(set.find("n-0123456789abcdef").unwrap().clone());
        let b = Some(set.find("a-0123456789abcdef").unwrap().clone());
        let scoped = |g: &Granted, cert: Option<&[u8]>| scoped_idempotency_key(g, cert, "order-1");
        assert_ne!(scoped(&a, None), scoped(&b, None));
        assert_eq!(scoped(&None, None), "order-1");
        let (cert_a, cert_b): (&[u8], &[u8]) = (b"cert a", b"cert b");
        assert_ne!(scoped(&None, Some(cert_a)), scoped(&None, Some(cert_b)));
        assert_ne!(scoped(&None, Some(cert_a)), "order-1");
        assert_eq!(scoped_idempotency_key(&a, None, ""), "");
    }
}
