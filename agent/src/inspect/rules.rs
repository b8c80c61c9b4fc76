//! What masking rules are made of, whatever the protocol: content detectors, strategies,
//! and a rule that ties them to names (columns for PostgreSQL; fields or paths for others).

use std::str::FromStr;

/// Content detectors for masking.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Detector {
    Email,
    Card,
    Ssn,
    Phone,
    Iban,
    AwsKey,
    Jwt,
    PrivateKey,
    Bearer,
}

impl Detector {
    pub const ALL: [Self; 9] = [
        Self::Email,
        Self::Card,
        Self::Ssn,
        Self::Phone,
        Self::Iban,
        Self::AwsKey,
        Self::Jwt,
        Self::PrivateKey,
        Self::Bearer,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Email => "email",
            Self::Card => "card",
            Self::Ssn => "ssn",
            Self::Phone => "phone",
            Self::Iban => "iban",
            Self::AwsKey => "aws_key",
            Self::Jwt => "jwt",
            Self::PrivateKey => "private_key",
            Self::Bearer => "bearer",
        }
    }
}

impl FromStr for Detector {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|d| d.as_str() == s)
            .ok_or_else(|| {
                format!(
                    "unknown detector `{s}` (use {})",
                    Self::ALL.map(Self::as_str).join(", ")
                )
            })
    }
}

/// What a mask does to a value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Strategy {
    /// `****`.
    Redact,
    /// Keep a hint: `j***@example.com`, `************4242`.
    Partial,
    /// A stable keyed pseudonym: equal inputs give equal outputs, so joins still line up.
    Hash,
    /// SQL NULL.
    Null,
}

impl Strategy {
    /// How little of the value survives: when one rule must stand for several (a value
    /// computed from more than one masked column), the strictest wins.
    pub fn strictness(self) -> u8 {
        match self {
            Self::Partial => 0,
            Self::Hash => 1,
            Self::Redact => 2,
            Self::Null => 3,
        }
    }
}

impl FromStr for Strategy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "redact" => Ok(Self::Redact),
            "partial" => Ok(Self::Partial),
            "hash" => Ok(Self::Hash),
            "null" => Ok(Self::Null),
            other => Err(format!(
                "unknown strategy `{other}` (use redact, partial, hash or null)"
            )),
        }
    }
}

/// A masking rule: columns by name glob, or detectors over every value, or both.
#[derive(Clone, Debug)]
pub struct MaskRule {
    /// `table.column` globs (`users.email`, `*.ssn`, `*password*`).
    pub columns: Vec<String>,
    pub detectors: Vec<Detector>,
    pub strategy: Strategy,
    /// Identities that see clear values.
    pub exempt_identities: Vec<String>,
}
