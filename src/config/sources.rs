//! Where a setting's value is found: the flag, then the environment, then
//! the config file, then the default; and the config file itself, which
//! holds only keys of the table.

use std::path::{Path, PathBuf};

use super::{
    ConfigError, Origin,
    table::{FILE_SETTINGS, Setting},
};

/// The sources below the flags.
pub(super) struct Sources<'a> {
    pub(super) env: &'a dyn Fn(&str) -> Option<String>,
    pub(super) file: Option<(PathBuf, toml::Table)>,
}

impl Sources<'_> {
    /// The first value found: flag, then environment, then file.
    fn find(&self, flag: Option<&str>, setting: &Setting) -> Option<(String, Origin)> {
        if let Some(value) = flag {
            return Some((value.to_owned(), Origin::Flag(setting.flag)));
        }
        for var in setting.env {
            if let Some(value) = (self.env)(var).filter(|v| !v.is_empty()) {
                return Some((value, Origin::Env(var)));
            }
        }
        let (path, table) = self.file.as_ref()?;
        let value = match table.get(setting.key)? {
            toml::Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        Some((
            value,
            Origin::File {
                key: setting.key,
                path: path.clone(),
            },
        ))
    }

    /// The setting parsed, or its default.
    pub(super) fn get<T>(
        &self,
        flag: Option<&str>,
        setting: &Setting,
        parse: fn(&str) -> Result<T, String>,
    ) -> Result<T, ConfigError> {
        let (value, origin) = self.find(flag, setting).unwrap_or_else(|| {
            let default = setting.default.unwrap_or_default();
            (default.to_owned(), Origin::Default(setting.flag))
        });
        parse(&value).map_err(|problem| ConfigError::Invalid { origin, problem })
    }

    /// The setting parsed, if any source has it.
    pub(super) fn optional<T>(
        &self,
        flag: Option<&str>,
        setting: &Setting,
        parse: fn(&str) -> Result<T, String>,
    ) -> Result<Option<T>, ConfigError> {
        self.find(flag, setting)
            .map(|(value, origin)| {
                parse(&value).map_err(|problem| ConfigError::Invalid { origin, problem })
            })
            .transpose()
    }
}

pub(super) fn read_config_file(path: &Path) -> Result<toml::Table, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::ReadFile {
        path: path.to_owned(),
        source,
    })?;
    let table: toml::Table = toml::from_str(&text).map_err(|e| ConfigError::ParseFile {
        path: path.to_owned(),
        message: super::toml_problem(&e, &text),
    })?;
    let known: Vec<&str> = FILE_SETTINGS.iter().map(|s| s.key).collect();
    if let Some(key) = table.keys().find(|key| !known.contains(&key.as_str())) {
        return Err(ConfigError::UnknownKey {
            path: path.to_owned(),
            key: key.clone(),
            known: known.join(", "),
        });
    }
    Ok(table)
}
