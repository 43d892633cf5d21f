//! Helpers for kmount integration tests.
