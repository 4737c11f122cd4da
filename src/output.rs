//! Output files appear whole or not at all: each is written beside its final
//! path under a hidden temporary name, synced, then renamed over it.

use std::path::Path;

use anyhow::{bail, Context as _, Result};

/// Fails early (before any long work) unless `path` can be written: it must not
/// be a directory, and its folder must exist and take new files.
pub fn check(path: &Path) -> Result<()> {
    if path.is_dir() {
        bail!("{} is a directory; give a file name to write", path.display());
    }
    let dir = folder(path);
    tempfile::Builder::new()
        .prefix(".inferalign-check")
        .tempfile_in(dir)
        .with_context(|| format!("cannot write into {}: check that the folder exists and is writable", dir.display()))?;
    Ok(())
}

/// Has `write` fill a temporary file next to `path`, then syncs it and moves it
/// to `path`. On any error the temporary file is removed and `path` is untouched.
pub fn write_with(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    check(path)?;
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let mut builder = tempfile::Builder::new();
    // A temporary file is private (0600); the finished one gets the mode any
    // new file would (0666 less the umask).
    #[cfg(unix)]
    builder.permissions(std::os::unix::fs::PermissionsExt::from_mode(0o666));
    let tmp = builder
        .prefix(&format!(".{name}."))
        .suffix(".tmp")
        .tempfile_in(folder(path))
        .with_context(|| format!("cannot create a temporary file beside {}", path.display()))?;
    write(tmp.path())?;
    std::fs::File::open(tmp.path()).and_then(|f| f.sync_all()).with_context(|| format!("cannot sync {}", tmp.path().display()))?;
    tmp.persist(path).with_context(|| format!("cannot move the finished file to {}", path.display()))?;
    Ok(())
}

/// Writes `bytes` to `path` whole or not at all.
pub fn write_bytes(path: &Path, bytes: &[u8]) -> Result<()> {
    write_with(path, |tmp| std::fs::write(tmp, bytes).with_context(|| format!("cannot write {}", tmp.display())))
}

fn folder(path: &Path) -> &Path {
    path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_write_leaves_nothing_and_a_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.gguf");
        std::fs::write(&path, b"old").unwrap();
        assert!(write_with(&path, |tmp| {
            std::fs::write(tmp, b"half")?;
            bail!("interrupted")
        })
        .is_err());
        assert_eq!(std::fs::read(&path).unwrap(), b"old");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "no temporary file is left");
        write_bytes(&path, b"new").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
        assert!(check(dir.path()).unwrap_err().to_string().contains("is a directory"));
        assert!(check(&dir.path().join("missing/out.gguf")).is_err());
    }

    #[cfg(unix)]
    #[test]
    fn a_written_file_has_the_mode_of_any_new_file() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let (ours, plain) = (dir.path().join("ours"), dir.path().join("plain"));
        write_bytes(&ours, b"x").unwrap();
        std::fs::write(&plain, b"x").unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode();
        assert_eq!(mode(&ours), mode(&plain));
    }
}
