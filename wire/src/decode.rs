//! Decoding outside input into the wire types, naming the field that is
//! wrong.

use std::fmt;

use serde::de::DeserializeOwned;

/// A field of outside input that does not decode: where it is (a path such
/// as `payload.authorization.nonce` or `claims[2].signature`; empty for
/// the whole input) and what is wrong with it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    /// The field's path, such as `payload.authorization.nonce` or `claims[2].signature`; empty for the whole input.
    pub path: String,
    /// What is wrong with the field, such as [`NOT_AN_ADDRESS`](crate::fields::NOT_AN_ADDRESS).
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

fn field_error(e: serde_path_to_error::Error<serde_json::Error>) -> FieldError {
    let path = e.path().to_string();
    let e = e.into_inner();
    // The position says nothing the path does not, and differs by encoding.
    let mut message = e.to_string();
    if e.line() != 0 {
        let position = format!(" at line {} column {}", e.line(), e.column());
        if let Some(stripped) = message.strip_suffix(&position) {
            message.truncate(stripped.len());
        }
    }
    FieldError { path: if path == "." || path == "?" { String::new() } else { path }, message }
}

/// `value` as `T`, or the first field that is not what `T` needs.
///
/// A `Value` keeps the last of a key given twice; decode outside input with
/// [`from_slice`], which refuses it.
pub fn from_value<T: DeserializeOwned>(value: serde_json::Value) -> Result<T, FieldError> {
    serde_path_to_error::deserialize(value).map_err(field_error)
}

/// The JSON object `bytes` as `T`, or the first field that is not what `T`
/// needs. Only an object is read (serde would also read a struct from an
/// array, by position), and a key given twice is refused.
pub fn from_slice<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, FieldError> {
    if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(FieldError::new("", "is not a JSON object"));
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut de).map_err(field_error)?;
    de.end().map_err(|e| FieldError::new("", format!("has data after the object: {e}")))?;
    Ok(value)
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
        let a = "0x0101010101010101010101010101010101010101";
        let twice = format!(r#"{{"inner": [{{"to": "{a}", "to": "{a}"}}]}}"#);
        let err = from_slice::<Outer>(twice.as_bytes()).unwrap_err();
        assert_eq!(err, FieldError::new("inner[0]", "duplicate field `to`"));
        let err = from_slice::<Outer>(br#"[[]]"#).unwrap_err();
        assert_eq!(err, FieldError::new("", "is not a JSON object"));
        let err = from_slice::<Outer>(b"{").unwrap_err();
        assert_eq!(err.path, "");
        assert!(err.message.starts_with("EOF"), "{err}");
        assert_eq!(err.under("body"), "body");
        assert_eq!(FieldError::new("[1].x", "m").under("claims"), "claims[1].x");
    }
}
