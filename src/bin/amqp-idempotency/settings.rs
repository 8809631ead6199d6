//! Resolved settings: the command line first, then the environment read by
//! [`Config::from_env`]'s rules, then the library's defaults.

use std::ffi::OsString;

use amqp_idempotency::Config;
use amqp_idempotency::records::Records;

use crate::Failure;
use crate::args::{Args, TargetKind};

/// Resolved settings: the command line first, then the environment, then
/// the library's defaults.
#[derive(Debug)]
pub(crate) struct Settings {
    /// The Redis deployment (standalone, Sentinel or cluster), its TLS
    /// files, and the broker for replay, as the library reads them.
    pub(crate) config: Config,
    /// Whether `--redis-url` overrode the environment.
    pub(crate) url_flag: bool,
    pub(crate) prefix: String,
    pub(crate) scope: Option<String>,
}

/// Reads the environment once with [`Config::from_vars`], which checks every
/// variable the library knows (and refuses a misspelt one), then applies the
/// command line's `--redis-url` and `--amqp-url`.
pub(crate) fn settings(args: &Args) -> Result<Settings, Failure> {
    let vars: Vec<(OsString, OsString)> = std::env::vars_os().collect();
    let mut config =
        Config::from_vars(vars.iter().map(|(name, value)| (name, value))).map_err(|err| {
            Failure::Usage(format!(
                "the environment does not configure amqp-idempotency: {err}; fix or unset \
                 {} (the CLI reads the same variables as the consumers)",
                err.variable()
            ))
        })?;
    if let Some(url) = &args.redis_url {
        config = config.with_redis_url(url.as_str());
    }
    if let Some(url) = &args.amqp_url {
        config = config.with_amqp_url(url.as_str());
    }
    let (prefix, prefix_source) = match &args.prefix {
        Some(prefix) => (prefix.clone(), "--prefix"),
        None => (config.key_prefix().to_owned(), "IDEMPOTENCY_KEY_PREFIX"),
    };
    check_name(&prefix, prefix_source, "a key prefix such as `idem`")?;
    let (scope, scope_source) = match &args.scope {
        Some(scope) => (Some(scope.clone()), "--scope"),
        None => (config.scope().map(str::to_owned), "IDEMPOTENCY_SCOPE"),
    };
    if let Some(scope) = &scope {
        check_name(scope, scope_source, "a consumer group such as `orders`")?;
    }
    config = config.with_key_prefix(prefix.as_str());
    Ok(Settings {
        config,
        url_flag: args.redis_url.is_some(),
        prefix,
        scope,
    })
}

/// Prefixes and scopes are non-empty and without spaces, as the library requires.
pub(crate) fn check_name(value: &str, source: &str, expected: &str) -> Result<(), Failure> {
    if value.is_empty() || value.contains(char::is_whitespace) {
        return Err(Failure::Usage(format!(
            "{source} is `{value}`; expected {expected}, non-empty and without spaces"
        )));
    }
    Ok(())
}

/// What a command names: a full key, or a fingerprint in a scope.
#[derive(Debug)]
pub(crate) enum Target {
    Key(String),
    Fingerprint { scope: String, fingerprint: String },
}

impl Target {
    /// The key, built as the consumers build it.
    pub(crate) fn key(&self, records: &Records) -> String {
        match self {
            Self::Key(key) => key.clone(),
            Self::Fingerprint { scope, fingerprint } => records.key(scope, fingerprint),
        }
    }
}

/// Reads the argument: `<prefix>:...` is a key, anything else a
/// fingerprint completed with the prefix and scope.
pub(crate) fn resolve_target(
    target: &str,
    settings: &Settings,
    forced: Option<TargetKind>,
) -> Result<Target, Failure> {
    if target.is_empty() {
        return Err(Failure::Usage("the fingerprint or key is empty".into()));
    }
    let prefix = &settings.prefix;
    let is_key = match forced {
        Some(kind) => kind == TargetKind::Key,
        None => target.starts_with(&format!("{prefix}:")),
    };
    if is_key {
        return Ok(Target::Key(target.to_owned()));
    }
    let Some(scope) = &settings.scope else {
        return Err(Failure::Usage(format!(
            "`{target}` does not start with `{prefix}:`, so it is read as a fingerprint, and a \
             fingerprint needs a scope: pass --scope <consumer group> (the queue name, unless the \
             consumers set IDEMPOTENCY_SCOPE) or set IDEMPOTENCY_SCOPE, or pass the full key \
             `{prefix}:<scope>:{target}`"
        )));
    };
    Ok(Target::Fingerprint {
        scope: scope.clone(),
        fingerprint: target.to_owned(),
    })
}
