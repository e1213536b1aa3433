//! Decoding outside input into the wire types, naming the field that is
//! wrong.

use std::fmt;

use serde::de::DeserializeOwned;

/// A field of outside input that does not decode: where it is (a path such
/// as `payload.authorization.nonce` or `claims[2].signature`; empty for
/// the whole input) and what is wrong with it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    pub path: String,
    pub message: String,
}

impl FieldError {
    /// An error of the field at `path`.
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self { path: path.into(), message: message.into() }
    }

    /// The path below `prefix` (`prefix.path`, or `prefix` for the whole).
    pub fn under(&self, prefix: &str) -> String {
        match (prefix.is_empty(), self.path.is_empty()) {
            (_, true) => prefix.to_owned(),
            (true, false) => self.path.clone(),
            (false, false) if self.path.starts_with('[') => format!("{prefix}{}", self.path),
            (false, false) => format!("{prefix}.{}", self.path),
        }
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() { f.write_str(&self.message) } else { write!(f, "{}: {}", self.path, self.message) }
    }
}

impl std::error::Error for FieldError {}

/// `value` as `T`, or the first field that is not what `T` needs.
pub fn from_value<T: DeserializeOwned>(value: serde_json::Value) -> Result<T, FieldError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        // A value deserializer's errors carry no position: the message is
        // the whole text.
        FieldError { path: if path == "." { String::new() } else { path }, message: e.into_inner().to_string() }
    })
}

/// The JSON `bytes` as `T`: [`from_value`] once they parse as JSON.
pub fn from_slice<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, FieldError> {
    let value = serde_json::from_slice(bytes).map_err(|e| FieldError::new("", format!("is not JSON: {e}")))?;
    from_value(value)
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    use super::*;

    #[derive(Debug, Deserialize)]
    #[allow(dead_code)]
    struct Outer {
        inner: Vec<Inner>,
    }

    #[derive(Debug, Deserialize)]
    #[allow(dead_code)]
    struct Inner {
        #[serde(with = "crate::fields::address")]
        to: alloy::primitives::Address,
    }

    #[test]
    fn errors_name_the_field_and_nothing_else() {
        let err = from_slice::<Outer>(br#"{"inner": [{"to": "0x00"}]}"#).unwrap_err();
        assert_eq!(err, FieldError::new("inner[0].to", crate::fields::NOT_AN_ADDRESS));
        assert_eq!(err.under("body"), "body.inner[0].to");
        let err = from_slice::<Outer>(br#"{"inner": [{}]}"#).unwrap_err();
        assert_eq!(err, FieldError::new("inner[0]", "missing field `to`"));
        let err = from_slice::<Outer>(b"{").unwrap_err();
        assert_eq!(err.path, "");
        assert!(err.message.starts_with("is not JSON"), "{err}");
        assert_eq!(err.under("body"), "body");
        assert_eq!(FieldError::new("[1].x", "m").under("claims"), "claims[1].x");
    }
}
