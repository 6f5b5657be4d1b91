//! What the central derives from its settings.

use std::path::PathBuf;

use super::settings::ServerConfig;
use crate::store::options::{Durability, Options as StoreOptions};

impl ServerConfig {
    /// Whether the central speaks TLS.
    pub fn tls_enabled(&self) -> bool {
        !self.tls_cert.as_os_str().is_empty()
    }

    /// Whether every connection must present a client certificate signed by
    /// `tls_client_ca` (mutual TLS). Then every agency is authenticated by
    /// its certificate, which names it, whether or not it has a secret: no
    /// agency can act without authenticating.
    pub fn requires_client_certificates(&self) -> bool {
        self.tls_enabled() && !self.tls_client_ca.as_os_str().is_empty()
    }

    /// [`ServerConfig::frame_timeout`] as a duration.
    pub fn frame_deadline(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.frame_timeout)
    }

    /// [`ServerConfig::idle_timeout`] as a duration.
    pub fn idle_deadline(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.idle_timeout)
    }

    /// [`ServerConfig::auth_timeout`] as a duration.
    pub fn auth_deadline(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.auth_timeout)
    }

    /// [`ServerConfig::shutdown_grace`] as a duration.
    pub fn shutdown_deadline(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.shutdown_grace)
    }

    /// The draw record's path, defaulted from the bets file's; `None` when
    /// a database keeps the bets (and the draw record, in a table).
    pub fn draw_record_path(&self) -> Option<PathBuf> {
        let bets = self.storage.file()?;
        Some(if self.draw_record.as_os_str().is_empty() {
            bets.with_extension("draw.toml")
        } else {
            self.draw_record.clone()
        })
    }

    /// What the store is handed to open: the target, its draw record,
    /// whether acknowledgements wait for stable storage, and how long a
    /// database may take to answer.
    pub fn store_options(&self) -> StoreOptions {
        StoreOptions {
            storage: self.storage.clone(),
            record: self.draw_record_path(),
            durability: if self.sync {
                Durability::Sync
            } else {
                Durability::NoSync
            },
            patience: std::time::Duration::from_secs(self.storage_connect_timeout),
        }
    }

    /// Where the draw record is, for messages and log lines.
    pub fn draw_record_shown(&self) -> String {
        self.draw_record_path().map_or_else(
            || "tables draw and draw_agencies".to_string(),
            |p| p.display().to_string(),
        )
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::SETTINGS;
    use crate::store::target::Storage;

    #[test]
    fn the_draw_record_defaults_beside_the_bets_file_as_documented() {
        let record = |storage: &str| {
            let server = ServerConfig {
                storage: Storage::File(storage.into()),
                ..ServerConfig::default()
            };
            server.draw_record_path().unwrap()
        };
        assert_eq!(record("bets.csv"), PathBuf::from("bets.draw.toml"));
        assert_eq!(
            record("/var/x/bets"),
            PathBuf::from("/var/x/bets.draw.toml")
        );
        // The three places that explain the default give the same example.
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let help = SETTINGS.iter().find(|s| s.key == "server.draw_record");
        let example = "bets.csv` -> `bets.draw.toml";
        assert!(help.unwrap().help().contains(example));
        let toml = std::fs::read_to_string(root.join("config.toml")).unwrap();
        let line = toml.lines().find(|l| l.starts_with("draw_record")).unwrap();
        assert!(line.contains("(bets.csv -> bets.draw.toml)"), "{line}");
        let docs = std::fs::read_to_string(root.join("docs/CONFIGURATION.md")).unwrap();
        let row = docs
            .lines()
            .find(|l| l.starts_with("| `server.draw_record`"));
        assert!(row.unwrap().contains("(`bets.csv` -> `bets.draw.toml`)"));
    }
}
