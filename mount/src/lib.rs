//! kmount mount
