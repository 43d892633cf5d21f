//! Relative paths on the wire, validated on both ends.

use serde::{Deserialize, Deserializer, Serialize};

/// Longest accepted path, as Linux's `PATH_MAX`.
pub const PATH_MAX: usize = 4096;
/// Longest accepted name, as Linux's `NAME_MAX`.
pub const NAME_MAX: usize = 255;

/// A path relative to the served root: names separated by single `/`, none of them empty, `.`
/// or `..`, no NUL byte, no leading or trailing `/`. The empty path is the root itself.
///
/// Deserialisation validates, so a `RelPath` received from the wire is always well formed.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Serialize)]
pub struct RelPath(#[serde(with = "serde_bytes")] Vec<u8>);

/// `RelPath("a/b")`, bytes that are not UTF-8 escaped: readable in logs.
impl std::fmt::Debug for RelPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RelPath(\"{}\")", self.0.escape_ascii())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RelPathError {
    #[error("path is longer than {PATH_MAX} bytes")]
    TooLong,
    #[error("a name is longer than {NAME_MAX} bytes")]
    NameTooLong,
    #[error("path has an empty, '.' or '..' component, or a leading or trailing '/'")]
    BadComponent,
    #[error("path contains a NUL byte")]
    Nul,
}

impl RelPathError {
    /// The errno a filesystem would give for this path.
    pub fn errno(&self) -> i32 {
        match self {
            RelPathError::TooLong | RelPathError::NameTooLong => 36, // ENAMETOOLONG
            RelPathError::BadComponent | RelPathError::Nul => 22,    // EINVAL
        }
    }
}

/// Checks one name (a single path component).
pub fn check_name(name: &[u8]) -> Result<(), RelPathError> {
    if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') {
        return Err(RelPathError::BadComponent);
    }
    if name.contains(&0) {
        return Err(RelPathError::Nul);
    }
    if name.len() > NAME_MAX {
        return Err(RelPathError::NameTooLong);
    }
    Ok(())
}

/// Checks a whole path (see [`RelPath`]).
fn check_path(bytes: &[u8]) -> Result<(), RelPathError> {
    if bytes.len() > PATH_MAX {
        return Err(RelPathError::TooLong);
    }
    if !bytes.is_empty() {
        for c in bytes.split(|&b| b == b'/') {
            check_name(c)?;
        }
    }
    Ok(())
}

impl RelPath {
    /// The root.
    pub fn root() -> Self {
        RelPath(Vec::new())
    }

    pub fn new(bytes: Vec<u8>) -> Result<Self, RelPathError> {
        check_path(&bytes)?;
        Ok(RelPath(bytes))
    }

    /// This path with one more name at the end.
    pub fn join(&self, name: &[u8]) -> Result<Self, RelPathError> {
        check_name(name)?;
        let mut v = Vec::with_capacity(self.0.len() + 1 + name.len());
        v.extend_from_slice(&self.0);
        if !v.is_empty() {
            v.push(b'/');
        }
        v.extend_from_slice(name);
        if v.len() > PATH_MAX {
            return Err(RelPathError::TooLong);
        }
        Ok(RelPath(v))
    }

    pub fn is_root(&self) -> bool {
        self.0.is_empty()
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The names, in order (none for the root).
    pub fn components(&self) -> impl Iterator<Item = &[u8]> {
        self.0.split(|&b| b == b'/').filter(|c| !c.is_empty())
    }

    /// Parent path and last name; `None` for the root.
    pub fn split_last(&self) -> Option<(RelPath, &[u8])> {
        if self.0.is_empty() {
            return None;
        }
        match self.0.iter().rposition(|&b| b == b'/') {
            Some(i) => Some((RelPath(self.0[..i].to_vec()), &self.0[i + 1..])),
            None => Some((RelPath::root(), &self.0[..])),
        }
    }
}

impl std::fmt::Display for RelPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0.is_empty() {
            f.write_str(".")
        } else {
            f.write_str(&String::from_utf8_lossy(&self.0))
        }
    }
}

impl<'de> Deserialize<'de> for RelPath {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let bytes: serde_bytes::ByteBuf = serde_bytes::ByteBuf::deserialize(d)?;
        match check_path(&bytes) {
            Ok(()) => Ok(RelPath(bytes.into_vec())),
            Err(e) => {
                let shown = String::from_utf8_lossy(&bytes[..bytes.len().min(64)]);
                let more = if bytes.len() > 64 { "..." } else { "" };
                Err(crate::frame::invalid(format!(
                    "path {shown:?}{more} ({} bytes) is refused: {e}",
                    bytes.len()
                )))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_plain_paths() {
        for p in ["", "a", "a/b", "a/b/.c", "...", "a b/ü"] {
            assert!(RelPath::new(p.as_bytes().to_vec()).is_ok(), "{p}");
        }
    }

    #[test]
    fn refuses_escapes_and_junk() {
        for p in [
            "/", "/a", "a/", "a//b", ".", "..", "a/..", "../a", "a/./b", "a\0b",
        ] {
            assert!(RelPath::new(p.as_bytes().to_vec()).is_err(), "{p:?}");
        }
        assert_eq!(
            RelPath::new(vec![b'a'; 256]),
            Err(RelPathError::NameTooLong)
        );
        assert!(RelPath::new(vec![b'a'; 255]).is_ok());
        let long: Vec<u8> = std::iter::repeat_n(b"abc/".to_vec(), 1100)
            .flatten()
            .collect();
        assert_eq!(RelPath::new(long), Err(RelPathError::TooLong));
    }

    #[test]
    fn join_and_split() {
        let a = RelPath::root().join(b"a").unwrap();
        let ab = a.join(b"b").unwrap();
        assert_eq!(ab.as_bytes(), b"a/b");
        let (parent, name) = ab.split_last().unwrap();
        assert_eq!(parent, a);
        assert_eq!(name, b"b");
        assert!(a.join(b"..").is_err());
        assert!(a.join(b"x/y").is_err());
        assert_eq!(ab.components().collect::<Vec<_>>(), vec![&b"a"[..], b"b"]);
    }

    #[test]
    fn wire_validation_rejects_bad_paths() {
        let bad = postcard::to_allocvec(&serde_bytes::Bytes::new(b"../etc")).unwrap();
        assert!(postcard::from_bytes::<RelPath>(&bad).is_err());
        let good = postcard::to_allocvec(&RelPath::new(b"x/y".to_vec()).unwrap()).unwrap();
        assert_eq!(
            postcard::from_bytes::<RelPath>(&good).unwrap().as_bytes(),
            b"x/y"
        );
    }
}
