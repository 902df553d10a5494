//! `Key`, the `(entity, id)` pair every subscription and notify names, and its validation rules.

use std::{fmt, sync::Arc};

/// Longest entity name or id accepted, in bytes.
pub(crate) const MAX_KEY_PART_BYTES: usize = 128;

/// One subscribable key, e.g. entity `items`, id `100`.
///
/// Both parts are `Arc<str>` so that the registry, the outbound queues and the
/// dispatcher can hold the same key without copying the strings.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct Key {
    pub(crate) entity: Arc<str>,
    pub(crate) id: Arc<str>,
}

/// Why a key part was refused; the message is safe to show to clients.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum KeyError {
    #[error("{0} must not be empty")]
    Empty(&'static str),
    #[error("{0} is longer than {MAX_KEY_PART_BYTES} bytes")]
    TooLong(&'static str),
    #[error("{0} must not contain '.', '*', '>', whitespace or control characters")]
    BadChar(&'static str),
}

impl Key {
    /// Validates both parts and builds the key.
    ///
    /// The character rules keep every key usable as NATS subject tokens
    /// (`{prefix}.changes.{entity}.{id}`), so a key accepted on one bus is
    /// accepted on every bus.
    pub(crate) fn new(entity: &str, id: &str) -> Result<Self, KeyError> {
        validate_part("entity", entity)?;
        validate_part("id", id)?;
        Ok(Self {
            entity: Arc::from(entity),
            id: Arc::from(id),
        })
    }
}

/// Checks one key part (`what` names it in the error).
pub(crate) fn validate_part(what: &'static str, value: &str) -> Result<(), KeyError> {
    if value.is_empty() {
        return Err(KeyError::Empty(what));
    }
    if value.len() > MAX_KEY_PART_BYTES {
        return Err(KeyError::TooLong(what));
    }
    if value
        .chars()
        .any(|c| matches!(c, '.' | '*' | '>') || c.is_whitespace() || c.is_control())
    {
        return Err(KeyError::BadChar(what));
    }
    Ok(())
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.entity, self.id)
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Key({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_keys() {
        let key = Key::new("items", "100").unwrap();
        assert_eq!(key.to_string(), "items/100");
        assert!(Key::new("user-profiles", "3f2a_b:c").is_ok());
    }

    #[test]
    fn refuses_bad_parts() {
        assert_eq!(Key::new("", "1"), Err(KeyError::Empty("entity")));
        assert_eq!(Key::new("items", ""), Err(KeyError::Empty("id")));
        assert_eq!(Key::new("a.b", "1"), Err(KeyError::BadChar("entity")));
        assert_eq!(Key::new("items", "1 2"), Err(KeyError::BadChar("id")));
        assert_eq!(Key::new("items", ">"), Err(KeyError::BadChar("id")));
        assert_eq!(Key::new("items", "\u{7}"), Err(KeyError::BadChar("id")));
        let long = "x".repeat(MAX_KEY_PART_BYTES + 1);
        assert_eq!(Key::new(&long, "1"), Err(KeyError::TooLong("entity")));
    }
}
