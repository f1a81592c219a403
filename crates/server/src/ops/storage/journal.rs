//! Images made before the database knows them.

use crate::context::Server;
use corral_model::ApiError;

pub(crate) fn journal_dir(s: &Server) -> std::path::PathBuf {
    s.state_dir.join("storage-journal")
}

/// A journal entry naming images on an SR that may have to be deleted.
pub(crate) struct Journal {
    pub(crate) path: std::path::PathBuf,
}

impl Journal {
    pub(crate) fn open(s: &Server, sr_uuid: &str, locations: &[&str]) -> Result<Journal, ApiError> {
        let dir = journal_dir(s);
        let io = |e: std::io::Error| ApiError::internal(format!("storage journal: {e}"));
        std::fs::create_dir_all(&dir).map_err(io)?;
        let path = dir.join(format!("{}.json", uuid::Uuid::new_v4()));
        let text = serde_json::json!({ "sr": sr_uuid, "locations": locations }).to_string();
        std::fs::write(&path, text).map_err(io)?;
        std::fs::File::open(&path)
            .and_then(|f| f.sync_all())
            .map_err(io)?;
        Ok(Journal { path })
    }

    pub(crate) fn add(&self, location: &str) {
        if let Ok(text) = std::fs::read_to_string(&self.path) {
            if let Ok(mut j) = serde_json::from_str::<serde_json::Value>(&text) {
                if let Some(a) = j["locations"].as_array_mut() {
                    a.push(serde_json::Value::String(location.to_owned()));
                }
                let _ = std::fs::write(&self.path, j.to_string());
                if let Ok(f) = std::fs::File::open(&self.path) {
                    let _ = f.sync_all();
                }
            }
        }
    }

    pub(crate) fn close(self) {
        let _ = std::fs::remove_file(&self.path);
    }
}
