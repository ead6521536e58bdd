//! NBD server (placeholder; built in the NBD issue).
