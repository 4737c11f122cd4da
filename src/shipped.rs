//! The vector files shipped in `gguf-vectors/`, found by the model's sha256.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _, Result};
use serde::{Deserialize, Serialize};

use crate::extract::sha256_file;

/// `$INFERALIGN_VECTORS`, else the `gguf-vectors/` this binary carries.
pub fn shipped_dir() -> Result<PathBuf> {
    match std::env::var_os("INFERALIGN_VECTORS") {
        Some(dir) => Ok(PathBuf::from(dir)),
        None => Ok(crate::embedded::root()?.join("gguf-vectors")),
    }
}

/// One shipped file and how it was made.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Entry {
    pub file: String,
    pub model_name: String,
    pub model_sha256: String,
    pub model_file_size: u64,
    /// The command that made it, from the repository root with the set-up cache.
    pub recipe: String,
    #[serde(default)]
    pub figures: serde_json::Value,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Manifest {
    pub vectors: Vec<Entry>,
}

impl Manifest {
    pub fn read(dir: &Path) -> Result<Manifest> {
        let path = dir.join("manifest.json");
        let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("{} is malformed", path.display()))
    }
}

/// The shipped gate/steering file for the model file `model`, or an error that says what to do.
pub fn vectors_for(model: &Path) -> Result<PathBuf> {
    let dir = shipped_dir()?;
    let manifest = Manifest::read(&dir)?;
    let size = std::fs::metadata(model)?.len();
    let candidates: Vec<&Entry> = manifest.vectors.iter().filter(|e| e.model_file_size == size).collect();
    if !candidates.is_empty() {
        let (sha, _) = sha256_file(model)?;
        if let Some(entry) = candidates.iter().find(|e| e.model_sha256 == sha) {
            return Ok(dir.join(&entry.file));
        }
    }
    let known: Vec<&str> = manifest.vectors.iter().map(|e| e.model_name.as_str()).collect();
    bail!(
        "no --gate given and no shipped vectors match {} (shipped: {}); make some with `inferalign extract`",
        model.display(),
        known.join(", ")
    )
}
