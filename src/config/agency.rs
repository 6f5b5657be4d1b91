//! What an agency derives from its settings.

use std::path::PathBuf;

use super::settings::AgencyConfig;
use super::ConfigError;

impl AgencyConfig {
    /// The secret to present, from `secret` or `secret_file`.
    ///
    /// # Errors
    /// The secret file cannot be read.
    pub fn load_secret(&self) -> Result<Option<String>, ConfigError> {
        if !self.secret_file.as_os_str().is_empty() {
            let text = std::fs::read_to_string(&self.secret_file).map_err(|source| {
                ConfigError::ReadFile {
                    setting: "agency.secret_file (CLI_SECRET_FILE)",
                    path: self.secret_file.clone(),
                    source,
                }
            })?;
            return Ok(Some(text.trim().to_string()));
        }
        Ok((!self.secret.is_empty()).then(|| self.secret.clone()))
    }

    /// The name the central's certificate must carry when the agency dials
    /// `address` (one entry of `server_address`): `tls_server_name`, else
    /// that address's host, so each central of a list is checked against
    /// its own name.
    pub fn tls_name(&self, address: &str) -> String {
        if !self.tls_server_name.is_empty() {
            return self.tls_server_name.clone();
        }
        let host = address.rsplit_once(':').map_or(address, |(h, _)| h);
        host.trim_start_matches('[')
            .trim_end_matches(']')
            .to_string()
    }

    /// [`AgencyConfig::reconnect_timeout`] as a duration.
    pub fn reconnect_patience(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.reconnect_timeout)
    }

    /// [`AgencyConfig::reply_timeout`] as a duration.
    pub fn reply_deadline(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.reply_timeout)
    }

    /// [`AgencyConfig::hello_timeout`] as a duration.
    pub fn hello_deadline(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.hello_timeout)
    }

    /// [`AgencyConfig::draw_timeout`] as a duration.
    pub fn draw_deadline(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.draw_timeout)
    }
}

impl AgencyConfig {
    /// The data file path with `{id}` replaced.
    pub fn data_path(&self) -> PathBuf {
        PathBuf::from(self.data_file.replace("{id}", &self.id.to_string()))
    }

    /// Where the seal is kept: `seal_file` with `{id}` replaced, or the
    /// data file's path followed by `.seal`.
    pub fn seal_path(&self) -> PathBuf {
        if self.seal_file.is_empty() {
            let mut path = self.data_path().into_os_string();
            path.push(".seal");
            return PathBuf::from(path);
        }
        PathBuf::from(self.seal_file.replace("{id}", &self.id.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_path_replaces_id() {
        let a = AgencyConfig {
            id: 4,
            ..AgencyConfig::default()
        };
        assert_eq!(a.data_path(), PathBuf::from(".data/agency-4.csv"));
    }
}
