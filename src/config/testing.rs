//! Helpers the configuration's unit tests share.

use std::collections::{BTreeSet, HashMap};

use super::settings::GLOBAL;
use super::{add_flags, Role, Setting, SETTINGS};

pub(super) const ROLES: [Role; 2] = [Role::Server, Role::Agency];
pub(super) const NOWHERE: &str = "/nonexistent/config.toml";

pub(super) fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
    let map: HashMap<String, String> = pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    move |k| map.get(k).cloned()
}

pub(super) fn file(text: &str) -> tempfile::NamedTempFile {
    let f = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(f.path(), text).unwrap();
    f
}

/// A config file that sets only `setting`, to `value`.
pub(super) fn file_setting(setting: &Setting, value: &str) -> tempfile::NamedTempFile {
    let (section, field) = setting.key.split_once('.').unwrap();
    let value = if setting.quoted {
        format!("{value:?}")
    } else {
        value.to_string()
    };
    file(&format!("[{section}]\n{field} = {value}\n"))
}

/// A command with every subcommand the declarations name, and the flags.
pub(super) fn command() -> clap::Command {
    let names: BTreeSet<&str> = SETTINGS
        .iter()
        .flat_map(|s| s.flag_on().iter().copied())
        .filter(|&on| on != GLOBAL)
        .collect();
    add_flags(clap::Command::new("lottery").subcommands(names.into_iter().map(clap::Command::new)))
}
