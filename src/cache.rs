//! Where set-up puts models and data: `$INFERALIGN_CACHE`, else `~/.cache/inferalign`.

use std::path::PathBuf;

pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("INFERALIGN_CACHE") {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("inferalign")
}

pub fn data_file(name: &str) -> PathBuf {
    cache_dir().join("data").join(name)
}
