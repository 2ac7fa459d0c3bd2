//! JSON read strictly: what an operator or another node sends (a provisioning line, a
//! request to the state owner) is refused when it carries a field this version does
//! not know, at any depth, so a misspelt setting is not dropped in silence and a newer
//! node's setting is not half carried out. Stored records are read leniently instead
//! (a newer version's fields passed over, [`crate::store::records`]), which is why the
//! strictness lives here and not on the types.

use serde::de::DeserializeOwned;

/// Why a strict read failed.
#[derive(Debug, thiserror::Error)]
pub enum StrictError {
    /// Not JSON, or not of the type's shape.
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    /// A field the type does not have; its path from the top (`numbers.0.settings.x`).
    #[error("unknown field `{0}`")]
    UnknownField(String),
}

/// Reads a `T` from `json`, refusing any field `T` does not have.
pub fn from_slice<T: DeserializeOwned>(json: &[u8]) -> Result<T, StrictError> {
    let mut unknown = None;
    let mut reader = serde_json::Deserializer::from_slice(json);
    let value = serde_ignored::deserialize(&mut reader, |path| {
        unknown.get_or_insert_with(|| dotted(&path));
    })?;
    reader.end()?;
    match unknown {
        Some(path) => Err(StrictError::UnknownField(path)),
        None => Ok(value),
    }
}

/// For `#[serde(deserialize_with = "…")]`: reads a field's value refusing any field its
/// type does not have. For types read leniently elsewhere (records) inside a type read
/// strictly; needed within an internally tagged enum, whose variants serde reads from a
/// buffer [`from_slice`] does not see into.
pub fn known_fields_only<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::Deserialize<'de>,
{
    let mut unknown = None;
    let value = serde_ignored::deserialize(deserializer, |path| {
        unknown.get_or_insert_with(|| dotted(&path));
    })?;
    match unknown {
        Some(path) => Err(serde::de::Error::custom(StrictError::UnknownField(path))),
        None => Ok(value),
    }
}

/// `path` as map keys and list indices joined by dots (an option's or a newtype's
/// level is no step a writer of the JSON sees).
fn dotted(path: &serde_ignored::Path<'_>) -> String {
    use serde_ignored::Path;
    match path {
        Path::Root => String::new(),
        Path::Seq { parent, index } => joined(dotted(parent), &index.to_string()),
        Path::Map { parent, key } => joined(dotted(parent), key),
        Path::Some { parent } | Path::NewtypeStruct { parent } | Path::NewtypeVariant { parent } => dotted(parent),
    }
}

fn joined(parent: String, step: &str) -> String {
    if parent.is_empty() {
        step.to_owned()
    } else {
        format!("{parent}.{step}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize, PartialEq)]
    struct Outer {
        name: String,
        #[serde(default)]
        inner: Option<Vec<Inner>>,
    }

    #[derive(Debug, serde::Deserialize, PartialEq)]
    struct Inner {
        on: bool,
    }

    #[test]
    fn a_field_the_type_lacks_is_refused_with_its_path_at_any_depth() {
        let read = from_slice::<Outer>(br#"{"name":"a","inner":[{"on":true},{"on":false,"of":1}]}"#);
        assert_eq!(read.unwrap_err().to_string(), "unknown field `inner.1.of`");
        let read = from_slice::<Outer>(br#"{"name":"a","nmae":"b"}"#);
        assert_eq!(read.unwrap_err().to_string(), "unknown field `nmae`");
    }

    #[test]
    fn json_of_known_fields_reads_and_bad_json_is_an_error() {
        let read = from_slice::<Outer>(br#"{"name":"a","inner":[{"on":true}]}"#).unwrap();
        assert_eq!(read, Outer { name: "a".into(), inner: Some(vec![Inner { on: true }]) });
        assert!(matches!(from_slice::<Outer>(br#"{"name":"a"} x"#), Err(StrictError::Json(_))));
        assert!(matches!(from_slice::<Outer>(br#"{"name":1}"#), Err(StrictError::Json(_))));
    }
}
