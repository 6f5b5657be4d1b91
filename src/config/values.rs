//! The types a setting can have, as text: parsed from a variable or flag,
//! shown in messages and `--help`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::str::FromStr;

use serde::Deserialize;

use super::address::{AdminAddress, ServerAddresses};
use crate::logging::{LogFormat, LogLevel};
use crate::store::target::Storage;

/// A value type a setting can have: parsed from a variable or flag, shown
/// in messages.
pub(super) trait Value: Sized {
    const HINT: &'static str;
    fn parse(raw: &str) -> Result<Self, String>;
    fn show(&self) -> String;
    #[cfg(test)]
    const SAMPLES: [&'static str; 2];
    #[cfg(test)]
    const QUOTED: bool;
}

macro_rules! value_by_text {
    ($($ty:ty: $hint:literal, $quoted:literal, [$a:literal, $b:literal];)*) => {$(
        impl Value for $ty {
            const HINT: &'static str = $hint;
            fn parse(raw: &str) -> Result<Self, String> {
                raw.trim().parse().map_err(|e: <$ty as FromStr>::Err| e.to_string())
            }
            fn show(&self) -> String {
                self.to_string()
            }
            #[cfg(test)]
            const SAMPLES: [&'static str; 2] = [$a, $b];
            #[cfg(test)]
            const QUOTED: bool = $quoted;
        }
    )*};
}

value_by_text! {
    u16: "N", false, ["3", "4"];
    u32: "N", false, ["3", "4"];
    u64: "N", false, ["3", "4"];
    usize: "N", false, ["3", "4"];
    bool: "BOOL", false, ["false", "true"];
    String: "TEXT", true, ["h:1", "h:2"];
    LogLevel: "LEVEL", true, ["DEBUG", "ERROR"];
    LogFormat: "FORMAT", true, ["json", "text"];
}

impl Value for PathBuf {
    const HINT: &'static str = "PATH";
    fn parse(raw: &str) -> Result<Self, String> {
        Ok(PathBuf::from(raw.trim()))
    }
    fn show(&self) -> String {
        self.display().to_string()
    }
    #[cfg(test)]
    const SAMPLES: [&'static str; 2] = ["a.csv", "b.csv"];
    #[cfg(test)]
    const QUOTED: bool = true;
}

impl Value for crate::close::CloseAt {
    const HINT: &'static str = "TIME";
    fn parse(raw: &str) -> Result<Self, String> {
        raw.parse()
    }
    fn show(&self) -> String {
        crate::close::CloseAt::show(self)
    }
    #[cfg(test)]
    const SAMPLES: [&'static str; 2] = ["2030-01-01T18:00:00Z", "2030-01-02T18:00:00Z"];
    #[cfg(test)]
    const QUOTED: bool = true;
}

impl Value for Storage {
    const HINT: &'static str = "PATH|URL";
    fn parse(raw: &str) -> Result<Self, String> {
        raw.parse()
    }
    /// Without a password: this text can reach messages.
    fn show(&self) -> String {
        self.to_string()
    }
    #[cfg(test)]
    const SAMPLES: [&'static str; 2] = ["a.csv", "postgres://u@h:5432/db"];
    #[cfg(test)]
    const QUOTED: bool = true;
}

impl Value for ServerAddresses {
    const HINT: &'static str = "HOST:PORT[,HOST:PORT...]";
    fn parse(raw: &str) -> Result<Self, String> {
        ServerAddresses::parse(raw)
    }
    fn show(&self) -> String {
        self.given.clone()
    }
    #[cfg(test)]
    const SAMPLES: [&'static str; 2] = ["h:1", "a:1,b:2"];
    #[cfg(test)]
    const QUOTED: bool = true;
}

impl Value for AdminAddress {
    const HINT: &'static str = "IP:PORT";
    fn parse(raw: &str) -> Result<Self, String> {
        AdminAddress::parse(raw)
    }
    fn show(&self) -> String {
        self.to_string()
    }
    #[cfg(test)]
    const SAMPLES: [&'static str; 2] = ["127.0.0.1:9100", "0.0.0.0:1"];
    #[cfg(test)]
    const QUOTED: bool = true;
}

impl<'de> Deserialize<'de> for Storage {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(d)?;
        raw.parse().map_err(serde::de::Error::custom)
    }
}

impl Value for BTreeMap<String, String> {
    const HINT: &'static str = "TABLE";
    fn parse(_: &str) -> Result<Self, String> {
        Err("a table is set in the config file only".into())
    }
    fn show(&self) -> String {
        format!("{} entries", self.len())
    }
    #[cfg(test)]
    const SAMPLES: [&'static str; 2] = ["", ""];
    #[cfg(test)]
    const QUOTED: bool = false;
}
