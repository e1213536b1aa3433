//! The formats of x402's JSON fields, with one parser each.
//!
//! x402 writes amounts and times as decimal strings (numbers are accepted
//! on input), addresses as 0x-hex (checksummed on output, any case on
//! input), 32-byte words and signatures as 0x-hex. The parsers are what
//! every decoder of outside input uses (JSON, protobuf strings, the
//! configuration); the `serde` modules apply them to struct fields, with
//! the same messages, so a decoder can name the field and say what is wrong.

use std::fmt;

use alloy::primitives::{Address, B256, Bytes, U256, hex};
use serde::{Deserialize, Deserializer, Serialize, Serializer, de};

/// Bytes from 0x-hex (`0x` or `0X` required).
pub fn parse_hex(s: &str) -> Option<Vec<u8>> {
    hex::decode(s.strip_prefix("0x").or_else(|| s.strip_prefix("0X"))?).ok()
}

/// A 20-byte address from 0x-hex, in any case (the checksum is not checked:
/// x402 clients send lowercase addresses).
pub fn parse_address(s: &str) -> Option<Address> {
    let bytes = parse_hex(s)?;
    (bytes.len() == 20).then(|| Address::from_slice(&bytes))
}

/// A 32-byte word from 0x-hex.
pub fn parse_b256(s: &str) -> Option<B256> {
    let bytes = parse_hex(s)?;
    (bytes.len() == 32).then(|| B256::from_slice(&bytes))
}

/// A decimal uint256 as x402 writes amounts (digits only: no sign, no
/// exponent, no hex).
pub fn parse_decimal_u256(s: &str) -> Option<U256> {
    if s.is_empty() || s.len() > 78 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    U256::from_str_radix(s, 10).ok()
}

/// What [`address`] says of a value that is not an address.
pub const NOT_AN_ADDRESS: &str = "is not a 20-byte hex address";
/// What [`word`] says of a value that is not a 32-byte word.
pub const NOT_A_WORD: &str = "is not 32 hex bytes";
/// What [`bytes`] says of a value that is not hex.
pub const NOT_HEX: &str = "is not 0x-hex";
/// What [`decimal`] says of a value that is not a uint256.
pub const NOT_A_UINT256: &str = "is not a uint256";

/// A uint256 written as a decimal string, x402's amount format. Reads a
/// decimal string or a JSON number.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DecimalU256(pub U256);

impl From<U256> for DecimalU256 {
    fn from(v: U256) -> Self {
        Self(v)
    }
}

impl fmt::Display for DecimalU256 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl Serialize for DecimalU256 {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for DecimalU256 {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Repr {
            Str(String),
            Num(u64),
        }
        match Repr::deserialize(d).map_err(|_| de::Error::custom(NOT_A_UINT256))? {
            Repr::Num(n) => Ok(Self(U256::from(n))),
            Repr::Str(s) => parse_decimal_u256(&s).map(Self).ok_or_else(|| de::Error::custom(NOT_A_UINT256)),
        }
    }
}

fn string<'de, D: Deserializer<'de>>(d: D, message: &'static str) -> Result<String, D::Error> {
    String::deserialize(d).map_err(|_| de::Error::custom(message))
}

/// `#[serde(with = "decimal")]`: a `U256` field as [`DecimalU256`].
pub mod decimal {
    use super::*;

    /// Writes `v` as a decimal string.
    pub fn serialize<S: Serializer>(v: &U256, s: S) -> Result<S::Ok, S::Error> {
        DecimalU256(*v).serialize(s)
    }

    /// Reads a decimal string or a JSON number, refusing anything else with [`NOT_A_UINT256`].
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<U256, D::Error> {
        DecimalU256::deserialize(d).map(|v| v.0)
    }
}

/// `#[serde(with = "address")]`: an address, checksummed on output.
pub mod address {
    use super::*;

    /// Writes `v` as EIP-55 checksummed 0x-hex.
    pub fn serialize<S: Serializer>(v: &Address, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(v)
    }

    /// Reads a 0x-hex address in any case, refusing anything else with [`NOT_AN_ADDRESS`].
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Address, D::Error> {
        parse_address(&string(d, NOT_AN_ADDRESS)?).ok_or_else(|| de::Error::custom(NOT_AN_ADDRESS))
    }
}

/// `#[serde(with = "word")]`: a 32-byte word as 0x-hex.
pub mod word {
    use super::*;

    /// Writes `v` as `0x` and 64 lowercase hex digits.
    pub fn serialize<S: Serializer>(v: &B256, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(v)
    }

    /// Reads 0x-hex of exactly 32 bytes, refusing anything else with [`NOT_A_WORD`].
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<B256, D::Error> {
        parse_b256(&string(d, NOT_A_WORD)?).ok_or_else(|| de::Error::custom(NOT_A_WORD))
    }
}

/// `#[serde(with = "bytes")]`: bytes as 0x-hex.
pub mod bytes {
    use super::*;

    /// Writes `v` as `0x` and lowercase hex.
    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&format_args!("0x{}", hex::encode(v)))
    }

    /// Reads 0x-hex of any byte length, refusing anything else with [`NOT_HEX`].
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Bytes, D::Error> {
        parse_hex(&string(d, NOT_HEX)?).map(Bytes::from).ok_or_else(|| de::Error::custom(NOT_HEX))
    }
}

/// A uint256 read as [`DecimalU256`] that must fit a narrower integer.
fn narrow<'de, D: Deserializer<'de>, T: TryFrom<U256>>(d: D, message: &'static str) -> Result<T, D::Error> {
    let DecimalU256(v) = DecimalU256::deserialize(d).map_err(|_| de::Error::custom(message))?;
    T::try_from(v).map_err(|_| de::Error::custom(message))
}

/// `#[serde(with = "u128_decimal")]`: an amount that fits a `u128`,
/// written as a decimal string (read from one, or from a JSON number that
/// fits a `u64`).
pub mod u128_decimal {
    use super::*;

    /// Writes `v` as a decimal string.
    pub fn serialize<S: Serializer>(v: &u128, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(v)
    }

    /// Reads a decimal string or a JSON number that fits a `u128`, refusing anything else with `is not a uint128`.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u128, D::Error> {
        narrow(d, "is not a uint128")
    }
}

/// `#[serde(with = "opt_u128_decimal")]`: an optional [`u128_decimal`].
pub mod opt_u128_decimal {
    use super::*;

    /// Writes `Some(v)` as a decimal string and `None` as `null`.
    pub fn serialize<S: Serializer>(v: &Option<u128>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(v) => s.collect_str(v),
            None => s.serialize_none(),
        }
    }

    /// Reads `null` as `None`, anything else as [`u128_decimal::deserialize`] does.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u128>, D::Error> {
        #[derive(Deserialize)]
        struct Wrap(#[serde(with = "u128_decimal")] u128);
        Ok(Option::<Wrap>::deserialize(d)?.map(|w| w.0))
    }
}

/// `#[serde(with = "u64_decimal")]`: a time or count that fits a `u64`,
/// written as a decimal string (a number is read too).
pub mod u64_decimal {
    use super::*;

    /// Writes `v` as a decimal string.
    pub fn serialize<S: Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(v)
    }

    /// Reads a decimal string or a JSON number that fits a `u64`, refusing anything else with `is not a uint64`.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        narrow(d, "is not a uint64")
    }
}

/// `#[serde(with = "uint40")]`: a channel's withdraw delay (`uint40`), a
/// number on output; beyond a `u64` it is refused as "is not a uint64",
/// beyond a `uint40` as "does not fit a uint40".
pub mod uint40 {
    use alloy::primitives::aliases::U40;

    use super::*;

    /// Writes `v` as a JSON number.
    pub fn serialize<S: Serializer>(v: &U40, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(v.to::<u64>())
    }

    /// Reads a decimal string or a JSON number that fits a `uint40`, refusing a larger one with
    /// `does not fit a uint40`.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<U40, D::Error> {
        let v: u64 = narrow(d, "is not a uint64")?;
        U40::try_from(v).map_err(|_| de::Error::custom("does not fit a uint40"))
    }
}

/// `#[serde(with = "salt")]`: a deposit salt as the reference client writes
/// it, 0x-hex of up to 32 bytes or decimal; written as 32-byte hex.
pub mod salt {
    use super::*;

    /// Writes `v` as 32-byte 0x-hex, big-endian.
    pub fn serialize<S: Serializer>(v: &U256, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&B256::from(*v))
    }

    /// Reads 0x-hex of up to 32 bytes (big-endian) or a decimal string, refusing longer hex and anything else.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<U256, D::Error> {
        const NOT_A_SALT: &str = "is not hex or decimal";
        let s = string(d, NOT_A_SALT)?;
        match parse_hex(&s) {
            Some(bytes) if bytes.len() <= 32 => Ok(U256::from_be_slice(&bytes)),
            Some(_) => Err(de::Error::custom("is longer than 32 bytes")),
            None => parse_decimal_u256(&s).ok_or_else(|| de::Error::custom(NOT_A_SALT)),
        }
    }
}

/// `#[serde(with = "opt_bytes")]`: optional bytes as 0x-hex (`null` or
/// absent: none; use with `#[serde(default)]`).
pub mod opt_bytes {
    use super::*;

    /// Writes `Some(v)` as 0x-hex and `None` as `null`.
    pub fn serialize<S: Serializer>(v: &Option<Bytes>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(v) => bytes::serialize(v, s),
            None => s.serialize_none(),
        }
    }

    /// Reads `null` as `None` and a string as 0x-hex, refusing anything else with [`NOT_HEX`].
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Bytes>, D::Error> {
        match Option::<String>::deserialize(d).map_err(|_| de::Error::custom(NOT_HEX))? {
            Some(s) => parse_hex(&s).map(|b| Some(b.into())).ok_or_else(|| de::Error::custom(NOT_HEX)),
            None => Ok(None),
        }
    }
}

/// `#[serde(with = "opt_address")]`: an optional [`address`] (`null` or
/// absent: none; use with `#[serde(default)]`).
pub mod opt_address {
    use super::*;

    /// Writes `Some(v)` as EIP-55 checksummed 0x-hex and `None` as `null`.
    pub fn serialize<S: Serializer>(v: &Option<Address>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(v) => s.collect_str(v),
            None => s.serialize_none(),
        }
    }

    /// Reads `null` as `None` and a string as an address in any case, refusing anything else with [`NOT_AN_ADDRESS`].
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Address>, D::Error> {
        match Option::<String>::deserialize(d).map_err(|_| de::Error::custom(NOT_AN_ADDRESS))? {
            Some(s) => parse_address(&s).map(Some).ok_or_else(|| de::Error::custom(NOT_AN_ADDRESS)),
            None => Ok(None),
        }
    }
}

/// `#[serde(with = "opt_u64_decimal")]`: an optional [`u64_decimal`].
pub mod opt_u64_decimal {
    use super::*;

    /// Writes `Some(v)` as a decimal string and `None` as `null`.
    pub fn serialize<S: Serializer>(v: &Option<u64>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(v) => s.collect_str(v),
            None => s.serialize_none(),
        }
    }

    /// Reads `null` as `None`, anything else as [`u64_decimal::deserialize`] does.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
        #[derive(Deserialize)]
        struct Wrap(#[serde(with = "u64_decimal")] u64);
        Ok(Option::<Wrap>::deserialize(d)?.map(|w| w.0))
    }
}

/// Bytes of exactly 20 (an address in protobuf or a ledger record).
pub fn address_from_bytes(bytes: &[u8]) -> Option<Address> {
    (bytes.len() == 20).then(|| Address::from_slice(bytes))
}

/// Bytes of exactly 32 (a word in protobuf or a ledger record).
pub fn word_from_bytes(bytes: &[u8]) -> Option<B256> {
    (bytes.len() == 32).then(|| B256::from_slice(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimal_reads_strings_and_numbers_and_nothing_else() {
        let read = |json: &str| serde_json::from_str::<DecimalU256>(json).map(|v| v.0);
        assert_eq!(read(r#""1000""#).unwrap(), U256::from(1000));
        assert_eq!(read("1000").unwrap(), U256::from(1000));
        assert_eq!(read(&format!(r#""{}""#, U256::MAX)).unwrap(), U256::MAX);
        for bad in [r#""""#, r#""-1""#, r#""1e3""#, r#""0x10""#, r#"" 1""#, "-1", "1.5", "null"] {
            let err = read(bad).unwrap_err().to_string();
            assert!(err.starts_with(NOT_A_UINT256), "{bad}: {err}");
        }
        let too_big = format!(r#""{}0""#, U256::MAX);
        assert!(read(&too_big).is_err());
        assert_eq!(serde_json::to_string(&DecimalU256(U256::from(7))).unwrap(), r#""7""#);
    }

    #[test]
    fn hex_fields_check_their_length() {
        assert_eq!(
            parse_address("0x5fbdb2315678afecb367f032d93f642f64180aa3"),
            parse_address("0X5FbDB2315678afecb367f032d93F642f64180aa3")
        );
        assert!(parse_address("5fbdb2315678afecb367f032d93f642f64180aa3").is_none(), "0x is required");
        assert!(parse_address("0x5fbdb2315678afecb367f032d93f642f64180a").is_none());
        assert!(parse_b256(&format!("0x{}", "ab".repeat(31))).is_none());
        assert_eq!(parse_b256(&format!("0x{}", "ab".repeat(32))), Some(B256::repeat_byte(0xab)));
        assert!(parse_hex("0xabc").is_none(), "odd length");
    }
}
