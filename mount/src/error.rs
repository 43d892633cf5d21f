//! Errors of the filesystem core: an errno for the kernel plus a note for the logs.

use kmount_proto::{RelPathError, WireError};

use crate::client::CallError;

/// A failed filesystem operation. `errno` is what the kernel hands to the caller, unchanged from
/// the agent when the agent produced it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message} (errno {errno})")]
pub struct FsError {
    /// Linux errno, always positive.
    pub errno: i32,
    pub message: String,
}

impl FsError {
    pub fn new(errno: i32, message: impl Into<String>) -> Self {
        Self {
            errno,
            message: message.into(),
        }
    }
}

/// `err!(libc::ENOENT, "no {}", name)` builds an [`FsError`].
#[macro_export]
macro_rules! err {
    ($errno:expr, $($fmt:tt)+) => {
        $crate::FsError::new($errno, format!($($fmt)+))
    };
}

impl From<WireError> for FsError {
    fn from(e: WireError) -> Self {
        FsError::new(e.errno, e.message)
    }
}

impl From<CallError> for FsError {
    fn from(e: CallError) -> Self {
        match e {
            CallError::Remote(w) => w.into(),
            other => FsError::new(libc::EIO, other.to_string()),
        }
    }
}

impl From<RelPathError> for FsError {
    fn from(e: RelPathError) -> Self {
        FsError::new(e.errno(), e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_passes_through_unchanged() {
        let e: FsError = WireError::new(libc::EACCES, "denied").into();
        assert_eq!(e.errno, libc::EACCES);
        let e: FsError = CallError::Remote(WireError::new(libc::ENOTEMPTY, "x")).into();
        assert_eq!(e.errno, libc::ENOTEMPTY);
        let e: FsError = CallError::Disconnected("gone".into()).into();
        assert_eq!(e.errno, libc::EIO);
        let e = err!(libc::ENOENT, "no {}", "x");
        assert_eq!(e.to_string(), format!("no x (errno {})", libc::ENOENT));
    }
}
