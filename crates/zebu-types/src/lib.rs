//! Shared identifiers and units for Zebu: newtypes with parsing and validation.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Errors from parsing or validating a value.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TypeError {
    #[error("invalid size {0:?}: use bytes or a number with KiB, MiB, GiB or TiB")]
    BadSize(String),
    #[error("invalid name {name:?}: {why}")]
    BadName { name: String, why: &'static str },
}

/// A size in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ByteSize(pub u64);

impl ByteSize {
    pub const KIB: u64 = 1024;
    pub const MIB: u64 = 1024 * 1024;
    pub const GIB: u64 = 1024 * 1024 * 1024;
    pub const TIB: u64 = 1024 * 1024 * 1024 * 1024;

    pub fn bytes(self) -> u64 {
        self.0
    }
}

impl FromStr for ByteSize {
    type Err = TypeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        let bad = || TypeError::BadSize(s.to_string());
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        if num.is_empty() {
            return Err(bad());
        }
        let n: u64 = num.parse().map_err(|_| bad())?;
        let mult = match unit.trim() {
            "" | "B" => 1,
            "K" | "KiB" => Self::KIB,
            "M" | "MiB" => Self::MIB,
            "G" | "GiB" => Self::GIB,
            "T" | "TiB" => Self::TIB,
            _ => return Err(bad()),
        };
        n.checked_mul(mult).map(ByteSize).ok_or_else(bad)
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let units = [
            (Self::TIB, "TiB"),
            (Self::GIB, "GiB"),
            (Self::MIB, "MiB"),
            (Self::KIB, "KiB"),
        ];
        for (m, u) in units {
            if self.0 >= m && self.0.is_multiple_of(m) {
                return write!(f, "{}{}", self.0 / m, u);
            }
        }
        write!(f, "{}", self.0)
    }
}

/// An engine session's generation number. Replicas refuse a session whose generation is lower than
/// the highest they have accepted.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default,
)]
#[serde(transparent)]
pub struct Generation(pub u64);

impl fmt::Display for Generation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Identifies one layer (snapshot or head) of a replica's chain. The same layer has the same id on
/// every replica of a volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct LayerId(pub u64);

impl fmt::Display for LayerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// Checks a resource name: 1–63 characters of lowercase letters, digits and `-`, starting and ending
/// with a letter or digit (a DNS label).
/// Backups of backing image `X` are kept and listed as the backups of `bi.X`: a name no volume
/// can have (names take no '.'), so the two never mix.
pub const IMAGE_OWNER_PREFIX: &str = "bi.";

/// The owner name under which a backing image's backups are kept.
pub fn image_owner(image: &str) -> String {
    format!("{IMAGE_OWNER_PREFIX}{image}")
}

/// The backing image an owner name stands for, if it is one.
pub fn owner_image(owner: &str) -> Option<&str> {
    owner.strip_prefix(IMAGE_OWNER_PREFIX)
}

pub fn validate_name(name: &str) -> Result<(), TypeError> {
    let bad = |why| TypeError::BadName {
        name: name.to_string(),
        why,
    };
    if name.is_empty() {
        return Err(bad("must not be empty"));
    }
    if name.len() > 63 {
        return Err(bad("must be at most 63 characters"));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err(bad("only lowercase letters, digits and '-' are allowed"));
    }
    if name.starts_with('-') || name.ends_with('-') {
        return Err(bad("must start and end with a letter or digit"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!("512MiB".parse::<ByteSize>(), Ok(ByteSize(512 << 20)));
        assert_eq!("1GiB".parse::<ByteSize>(), Ok(ByteSize(1 << 30)));
        assert_eq!("4096".parse::<ByteSize>(), Ok(ByteSize(4096)));
        assert!("".parse::<ByteSize>().is_err());
        assert!("12XB".parse::<ByteSize>().is_err());
        assert!("99999999999999TiB".parse::<ByteSize>().is_err());
        assert_eq!(ByteSize(3 << 30).to_string(), "3GiB");
    }

    #[test]
    fn names_validate() {
        assert!(validate_name("v1").is_ok());
        assert!(validate_name("").is_err());
        assert!(validate_name("a/b").is_err());
        assert!(validate_name("..").is_err());
        assert!(validate_name("-a").is_err());
        assert!(validate_name(&"a".repeat(64)).is_err());
    }
}
