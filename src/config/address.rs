//! `agency.server_address`: the list of centrals an agency may dial.

use std::fmt;
use std::net::SocketAddr;

use serde::Deserialize;

/// `server.admin_address`: where the admin listener (metrics, the status
/// page, health probes) listens, or nowhere (empty, the default). An IP
/// address and a port, never a host name: the operator chooses the
/// interface it is reachable on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct AdminAddress(pub Option<SocketAddr>);

impl AdminAddress {
    /// Reads `IP:PORT`, or nothing (blank) for off.
    ///
    /// # Errors
    /// Not blank and not `IP:PORT`.
    pub fn parse(raw: &str) -> Result<AdminAddress, String> {
        let raw = raw.trim();
        if raw.is_empty() {
            return Ok(AdminAddress(None));
        }
        raw.parse::<SocketAddr>()
            .map(|a| AdminAddress(Some(a)))
            .map_err(|_| {
                format!(
                    "`{raw}` is not IP:PORT (for example 127.0.0.1:9100, or 0.0.0.0:9100 in a \
                 container); leave it empty to keep the admin listener off"
                )
            })
    }
}

impl TryFrom<String> for AdminAddress {
    type Error = String;
    fn try_from(raw: String) -> Result<Self, String> {
        AdminAddress::parse(&raw)
    }
}

impl fmt::Display for AdminAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(address) => write!(f, "{address}"),
            None => Ok(()),
        }
    }
}

/// `agency.server_address`: the centrals an agency may use, in the order it
/// tries them. Parsed once, where settings are read, so the agency only
/// ever sees well-formed `host:port` entries, and never an empty list.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct ServerAddresses {
    /// The setting as written (trimmed): what the `config` line shows.
    pub(super) given: String,
    /// Its entries, each `host:port`, at least one.
    list: Vec<String>,
}

impl ServerAddresses {
    /// Reads `host:port[,host:port…]`.
    ///
    /// # Errors
    /// An entry is empty or not `host:port` (with a port in 1..=65535); the
    /// message quotes that entry.
    pub fn parse(raw: &str) -> Result<ServerAddresses, String> {
        let given = raw.trim();
        let list = given
            .split(',')
            .map(|entry| check_host_port(entry.trim()).map(str::to_string))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(ServerAddresses {
            given: given.to_string(),
            list,
        })
    }

    /// The addresses, in the order they are tried.
    pub fn as_slice(&self) -> &[String] {
        &self.list
    }

    /// The first address: where a single probe goes.
    pub fn first(&self) -> &str {
        &self.list[0] // never empty: `split` yields at least one entry
    }

    /// The setting as written.
    pub fn as_str(&self) -> &str {
        &self.given
    }
}

/// One entry of `agency.server_address`.
fn check_host_port(entry: &str) -> Result<&str, String> {
    let bad = |why: &str| Err(format!("{entry:?} {why} (each address is host:port)"));
    if entry.is_empty() {
        return Err("an address is empty: the list has a stray comma".to_string());
    }
    let Some((host, port)) = entry.rsplit_once(':') else {
        return bad("has no port");
    };
    if host.is_empty() {
        return bad("has no host");
    }
    if host.contains(':') && !(host.starts_with('[') && host.ends_with(']')) {
        return bad("is an IPv6 address without brackets ([::1]:12345)");
    }
    match port.parse::<u16>() {
        Ok(0) | Err(_) => bad("has no valid port (1..=65535)"),
        Ok(_) => Ok(entry),
    }
}

impl From<SocketAddr> for ServerAddresses {
    fn from(address: SocketAddr) -> Self {
        let one = address.to_string();
        ServerAddresses {
            given: one.clone(),
            list: vec![one],
        }
    }
}

impl TryFrom<String> for ServerAddresses {
    type Error = String;
    fn try_from(raw: String) -> Result<Self, String> {
        ServerAddresses::parse(&raw)
    }
}

impl fmt::Display for ServerAddresses {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.given)
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::config::testing::*;
    use crate::config::{Config, Role};

    #[test]
    fn server_address_is_a_list_of_host_port_in_order() {
        let load = |raw: &str| {
            Config::load(
                Path::new(NOWHERE),
                Role::Agency,
                env(&[("CLI_SERVER_ADDRESS", raw)]),
            )
        };
        let c = load(" central-1:12345, central-2:12345 ,[::1]:7 ").unwrap();
        let a = &c.agency.server_address;
        assert_eq!(
            a.as_slice(),
            ["central-1:12345", "central-2:12345", "[::1]:7"]
        );
        assert_eq!(a.first(), "central-1:12345");
        assert_eq!(a.to_string(), "central-1:12345, central-2:12345 ,[::1]:7");
        assert_eq!(c.agency.tls_name("[::1]:7"), "::1");
        assert_eq!(c.agency.tls_name("central-2:12345"), "central-2");
        assert_eq!(
            Config::default().agency.server_address.as_slice(),
            ["127.0.0.1:12345"]
        );
        for (raw, says) in [
            ("a:1,b", "\"b\" has no port"),
            ("a:1,,b:2", "an address is empty"),
            ("a:1,", "an address is empty"),
            (":5", "\":5\" has no host"),
            ("a:1,b:0", "\"b:0\" has no valid port"),
            ("a:x", "\"a:x\" has no valid port"),
            ("::1:5", "without brackets"),
        ] {
            let e = load(raw).unwrap_err().to_string();
            assert!(
                e.starts_with(&format!("invalid CLI_SERVER_ADDRESS = {raw:?}: "))
                    && e.contains(says),
                "{raw}: {e}"
            );
        }
        let f = file("[agency]\nserver_address = \"a:1,b\"\n");
        let e = Config::load(f.path(), Role::Agency, env(&[])).unwrap_err();
        assert!(
            e.to_string().contains("server_address") && e.to_string().contains("\"b\" has no port"),
            "{e}"
        );
    }
}
