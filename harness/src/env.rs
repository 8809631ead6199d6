//! The service URLs: environment variables with the defaults of a local
//! RabbitMQ and Redis.

/// RabbitMQ on this machine, as the broker starts with `rabbitmq-server -detached`.
pub const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// Redis on this machine, on its usual port.
pub const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379";

/// The value of the environment variable `name`, or `default` when it is
/// unset or blank; an error when it is not valid UTF-8.
pub fn env_or(name: &str, default: &str) -> Result<String, String> {
    match std::env::var(name) {
        Ok(value) if !value.trim().is_empty() => Ok(value),
        Ok(_) | Err(std::env::VarError::NotPresent) => Ok(default.to_owned()),
        Err(std::env::VarError::NotUnicode(_)) => Err(format!("{name} is not valid UTF-8")),
    }
}
