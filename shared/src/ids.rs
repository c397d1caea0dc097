//! Human-chosen identifiers (organisation slugs, device names, model names).
//!
//! Invariant: a [`Name`] is 1..=64 bytes of lowercase ASCII letters, digits, `-`, `_` or `.`,
//! and starts with a letter or digit. That keeps names safe in URLs, MQTT topics, file names
//! and certificate URI SANs without escaping.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Maximum length of a [`Name`] in bytes.
pub const NAME_MAX_LEN: usize = 64;

/// Why a string is not a valid [`Name`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("must not be empty")]
    Empty,
    #[error("must be at most {NAME_MAX_LEN} characters, got {0}")]
    TooLong(usize),
    #[error("must start with a lowercase letter or digit")]
    BadStart,
    #[error("may only contain lowercase letters, digits, '-', '_' and '.', found {0:?}")]
    BadChar(char),
}

/// A validated identifier; see the module docs for the rules.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct Name(String);

impl Name {
    /// Checks `s` against the naming rules.
    pub fn parse(s: &str) -> Result<Self, NameError> {
        if s.is_empty() {
            return Err(NameError::Empty);
        }
        if s.len() > NAME_MAX_LEN {
            return Err(NameError::TooLong(s.len()));
        }
        let mut chars = s.chars();
        if !chars
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        {
            return Err(NameError::BadStart);
        }
        if let Some(c) = s
            .chars()
            .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || "-_.".contains(*c)))
        {
            return Err(NameError::BadChar(c));
        }
        Ok(Self(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Name {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Name::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_typical_names() {
        for ok in ["acme", "gw-01", "plant_3.line-2", "0day"] {
            assert_eq!(Name::parse(ok).unwrap().as_str(), ok);
        }
    }

    #[test]
    fn rejects_names_that_would_need_escaping() {
        assert_eq!(Name::parse(""), Err(NameError::Empty));
        assert_eq!(Name::parse("-x"), Err(NameError::BadStart));
        assert_eq!(Name::parse("Acme"), Err(NameError::BadStart));
        assert_eq!(Name::parse("a/b"), Err(NameError::BadChar('/')));
        assert_eq!(Name::parse("a b"), Err(NameError::BadChar(' ')));
        assert_eq!(Name::parse(&"a".repeat(65)), Err(NameError::TooLong(65)));
    }

    #[test]
    fn deserialize_reports_the_rule() {
        let err = serde_json::from_str::<Name>("\"A\"").unwrap_err();
        assert!(err.to_string().contains("must start with"), "{err}");
    }

    proptest::proptest! {
        #![proptest_config(crate::test_support::proptest_config(2000))]

        #[test]
        fn any_string_is_a_name_exactly_when_it_follows_the_rules(s in "\\PC{0,70}|[a-z0-9._-]{0,70}") {
            let follows = !s.is_empty()
                && s.len() <= NAME_MAX_LEN
                && s.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
                && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b));
            proptest::prop_assert_eq!(Name::parse(&s).is_ok(), follows);
            // Through JSON as well.
            let json = serde_json::to_string(&s).unwrap();
            proptest::prop_assert_eq!(serde_json::from_str::<Name>(&json).is_ok(), follows);
        }
    }
}
