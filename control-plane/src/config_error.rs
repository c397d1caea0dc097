//! The configuration error, in a leaf module so that the domain modules that validate their
//! own sections (`llm::config`, `models::mlflow`) and the top-level [`crate::config`] that
//! assembles them share it without importing each other in a cycle.

use std::path::PathBuf;

/// Why the configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid value for environment variable {var}: {message}")]
    Env { var: &'static str, message: String },
    #[error("invalid config: {field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
}
