//! Log files that stay bounded: past `max_bytes` the file is renamed to
//! `<name>.1` (older generations shift up, the oldest is dropped) and a new
//! one is started. Used for `corrald.log` and `audit.log`.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

pub struct RotatingFile {
    path: PathBuf,
    file: File,
    written: u64,
    max_bytes: u64,
    keep: u32,
}

/// What corrald keeps of each log: 4 files of 16 MiB.
pub const MAX_BYTES: u64 = 16 << 20;

pub const KEEP: u32 = 3;

pub(crate) fn open(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
}

impl RotatingFile {
    pub fn open(path: &Path, max_bytes: u64, keep: u32) -> std::io::Result<RotatingFile> {
        let file = open(path)?;
        let written = file.metadata().map(|m| m.len()).unwrap_or(0);
        Ok(RotatingFile {
            path: path.to_owned(),
            file,
            written,
            max_bytes,
            keep,
        })
    }

    fn generation(&self, n: u32) -> PathBuf {
        let mut p = self.path.clone().into_os_string();
        p.push(format!(".{n}"));
        p.into()
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        for n in (1..self.keep).rev() {
            let _ = std::fs::rename(self.generation(n), self.generation(n + 1));
        }
        if self.keep > 0 {
            std::fs::rename(&self.path, self.generation(1))?;
        } else {
            std::fs::remove_file(&self.path)?;
        }
        self.file = open(&self.path)?;
        self.written = 0;
        Ok(())
    }
}

/// Rotation happens between writes: callers write a whole line at once
/// (tracing does; so does the audit log).
impl Write for RotatingFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.written > 0 && self.written + buf.len() as u64 > self.max_bytes {
            // Keep logging into the old file if the rotation fails.
            let _ = self.rotate();
        }
        let n = self.file.write(buf)?;
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotates_and_keeps_a_bounded_number_of_files() {
        let dir = std::env::temp_dir().join(format!("corral-logfile-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("x.log");
        let mut f = RotatingFile::open(&p, 100, 2).unwrap();
        for i in 0..50 {
            f.write_all(format!("line {i:040}\n").as_bytes()).unwrap();
        }
        let mut names: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["x.log", "x.log.1", "x.log.2"]);
        for n in &names {
            assert!(std::fs::metadata(dir.join(n)).unwrap().len() <= 100);
        }
        assert!(
            std::fs::read_to_string(&p)
                .unwrap()
                .ends_with(&format!("line {:040}\n", 49))
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
