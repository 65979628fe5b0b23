//! Command-line options shared by every binary.

use std::path::PathBuf;

use clap::{Args, CommandFactory, FromArgMatches};
use iot_core::Config;

/// Options every service takes.
#[derive(Debug, Clone, Args)]
pub struct CommonArgs {
    /// YAML config file (see config.example.yaml). Without it: defaults plus
    /// environment overrides.
    #[arg(short, long, value_name = "FILE", env = "IOT_CONFIG")]
    pub config: Option<PathBuf>,
}

/// Text appended to `--help`: every config key with its default.
pub fn config_help() -> String {
    let mut s = String::from(
        "Configuration keys (YAML file; environment IOT_<SECTION>_<KEY> overrides, \
         plus SERVER_ID, REDIS_URL, DATABASE_URL; durations like 500ms, 5s, 5m):\n",
    );
    for (key, default) in Config::default_keys() {
        s.push_str(&format!("  {key:<32} default {default}\n"));
    }
    s
}

/// Parses the command line of `T`, with [`config_help`] after `--help`.
pub fn parse<T: CommandFactory + FromArgMatches>() -> T {
    let matches = T::command().after_long_help(config_help()).get_matches();
    match T::from_arg_matches(&matches) {
        Ok(t) => t,
        Err(e) => e.exit(),
    }
}
