//! Files the binary carries, so an installed `inferalign` needs no checkout:
//! the shipped vectors and the prompt sets commands default to. They are
//! written once into the cache, where file readers (llama.cpp's among them)
//! can open them.

use std::path::PathBuf;

use anyhow::{Context as _, Result};
use sha2::{Digest, Sha256};

macro_rules! carried {
    ($($name:literal),* $(,)?) => { &[$(($name, include_bytes!(concat!("../", $name)))),*] };
}

const FILES: &[(&str, &[u8])] = carried![
    "gguf-vectors/manifest.json",
    "gguf-vectors/qwen2.5-coder-0.5b-instruct-q4_k_m.srv.gguf",
    "gguf-vectors/gemma-3-270m-q4_k_m.srv.gguf",
    "data/harmless.txt",
    "data/jailbreaks.jsonl",
    "data/tasks.jsonl",
];

/// The folder holding this build's carried files (`gguf-vectors/`, `data/`),
/// written on first use; one folder per content, so builds never mix.
pub fn root() -> Result<PathBuf> {
    let mut hash = Sha256::new();
    for (name, bytes) in FILES {
        hash.update(name.as_bytes());
        hash.update(bytes);
    }
    let root = crate::cache::cache_dir().join("carried").join(&format!("{:x}", hash.finalize())[..16]);
    for (name, bytes) in FILES {
        let path = root.join(name);
        if std::fs::metadata(&path).is_ok_and(|m| m.len() == bytes.len() as u64) {
            continue;
        }
        let dir = path.parent().expect("carried files sit in a folder");
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}; set INFERALIGN_CACHE to a writable folder", dir.display()))?;
        crate::output::write_bytes(&path, bytes)?;
    }
    Ok(root)
}

/// One of the prompt sets in `data/`.
pub fn data(name: &str) -> Result<PathBuf> {
    Ok(root()?.join("data").join(name))
}
