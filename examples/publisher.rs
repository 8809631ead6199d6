//! The seed's `amqp_publisher.php`: publishes one message to the exchange `router`.
//!
//! The body is the positional arguments joined by spaces, sent with the
//! routing key `""`, `content_type: text/plain` and `delivery_mode: 2`
//! (persistent). Publisher confirms are on: the program waits for the broker
//! to confirm each message and fails if it was nacked, or if no queue is bound
//! to `router` (start `basic_nack` first, it declares and binds `msgs`).
//!
//! ```text
//! cargo run --example publisher -- good
//! cargo run --example publisher -- --message-id order-7 good
//! cargo run --example publisher -- --repeat 2 good          # a double click
//! cargo run --example publisher -- --header user-id=42 --header source=web good
//! cargo run --example publisher -- -- --literal-body        # `--` ends the options
//! ```
//!
//! Options:
//!
//! - `--message-id ID`: the AMQP `message_id`, which the middleware uses as the
//!   fingerprint. Without it, the fingerprint is a hash of the body, so the
//!   same body twice is a duplicate.
//! - `--header NAME=VALUE` (repeatable): a message header (string value).
//! - `--repeat N`: publish the same message N times (default 1), as a producer
//!   retry or a double click would.
//!
//! The broker URL comes from `AMQP_URL` (default
//! `amqp://guest:guest@127.0.0.1:5672/%2f`); for `amqps://`, the TLS files
//! from `AMQP_TLS_CA_FILE`, `AMQP_TLS_CERT_FILE` and `AMQP_TLS_KEY_FILE`.

use std::process::ExitCode;
use std::time::Duration;

use amqp_idempotency::{Config, amqp};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Confirmation, ConnectionProperties, ExchangeKind};

const EXCHANGE: &str = "router";

const USAGE: &str =
    "usage: publisher [--message-id ID] [--header NAME=VALUE]... [--repeat N] [--] WORD...
publishes WORD... joined by spaces to the exchange `router` (routing key \"\")";

#[derive(Debug)]
struct Args {
    body: String,
    message_id: Option<ShortString>,
    headers: Vec<(ShortString, String)>,
    repeat: u32,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(Some(args)) => args,
        Ok(None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(message) => {
            eprintln!("error: {message}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match publish(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

/// `Ok(None)` means `--help`.
fn parse_args(mut argv: impl Iterator<Item = String>) -> Result<Option<Args>, String> {
    let mut words = Vec::new();
    let mut message_id = None;
    let mut headers = Vec::new();
    let mut repeat = 1;
    while let Some(arg) = argv.next() {
        let mut value = |option: &str| argv.next().ok_or_else(|| format!("{option} needs a value"));
        match arg.as_str() {
            "-h" | "--help" => return Ok(None),
            "--message-id" => {
                let id = value("--message-id")?;
                if id.trim().is_empty() {
                    return Err("--message-id must not be empty".into());
                }
                message_id = Some(short_string(&id, "--message-id")?);
            }
            "--header" => {
                let header = value("--header")?;
                let Some((name, value)) = header.split_once('=') else {
                    return Err(format!("--header expects NAME=VALUE, got {header:?}"));
                };
                if name.is_empty() {
                    return Err(format!("--header {header:?} has an empty name"));
                }
                headers.push((short_string(name, "a header name")?, value.to_owned()));
            }
            "--repeat" => {
                let n = value("--repeat")?;
                repeat =
                    n.parse().ok().filter(|n| *n >= 1).ok_or_else(|| {
                        format!("--repeat expects a whole number >= 1, got {n:?}")
                    })?;
            }
            "--" => {
                words.extend(argv.by_ref());
                break;
            }
            option if option.starts_with("--") => {
                return Err(format!("unknown option {option}"));
            }
            _ => words.push(arg),
        }
    }
    Ok(Some(Args {
        body: words.join(" "),
        message_id,
        headers,
        repeat,
    }))
}

/// AMQP short strings hold at most 255 bytes.
fn short_string(text: &str, what: &str) -> Result<ShortString, String> {
    ShortString::try_new(text)
        .map_err(|_| format!("{what} is {} bytes long; AMQP allows 255", text.len()))
}

async fn publish(args: Args) -> Result<(), String> {
    // Only AMQP_URL and AMQP_TLS_* matter here: the IDEMPOTENCY_* settings
    // are the consumer's.
    let config = Config::from_lookup(|name| {
        name.starts_with("AMQP_")
            .then(|| std::env::var(name).ok())
            .flatten()
    })
    .map_err(|err| format!("{err}\n       fix or unset that variable"))?;
    let connection = match tokio::time::timeout(
        Duration::from_secs(10),
        amqp::connect(&config, ConnectionProperties::default()),
    )
    .await
    {
        Ok(Ok(connection)) => connection,
        Ok(Err(err)) if err.is_io() => {
            return Err(format!(
                "{err}\n       (or `docker-compose up -d rabbitmq`)"
            ));
        }
        Ok(Err(err)) => return Err(err.to_string()),
        Err(_) => {
            return Err("RabbitMQ (AMQP_URL) did not answer within 10s; check AMQP_URL".to_owned());
        }
    };
    let channel = connection
        .create_channel()
        .await
        .map_err(|err| format!("cannot open a channel: {err}"))?;
    channel
        .exchange_declare(
            EXCHANGE.into(),
            ExchangeKind::Direct,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(|err| format!("cannot declare the exchange `{EXCHANGE}`: {err}"))?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(|err| format!("cannot enable publisher confirms: {err}"))?;

    let mut properties = BasicProperties::default()
        .with_content_type("text/plain".into())
        .with_delivery_mode(2);
    if let Some(id) = &args.message_id {
        properties = properties.with_message_id(id.clone());
    }
    if !args.headers.is_empty() {
        let mut table = FieldTable::default();
        for (name, value) in &args.headers {
            table.insert(
                name.clone(),
                AMQPValue::LongString(LongString::from(value.as_str())),
            );
        }
        properties = properties.with_headers(table);
    }

    let id = args.message_id.as_ref().map_or_else(
        || "none: the body hash is the fingerprint".to_owned(),
        |id| format!("{:?}", id.as_str()),
    );
    for n in 1..=args.repeat {
        // mandatory: an unroutable message comes back instead of vanishing.
        let options = BasicPublishOptions {
            mandatory: true,
            ..BasicPublishOptions::default()
        };
        let confirm = channel
            .basic_publish(
                EXCHANGE.into(),
                "".into(),
                options,
                args.body.as_bytes(),
                properties.clone(),
            )
            .await
            .map_err(|err| format!("publish failed: {err}"))?;
        let confirmation = confirm
            .await
            .map_err(|err| format!("no confirmation from the broker: {err}"))?;
        match confirmation {
            Confirmation::Ack(None) => {}
            Confirmation::Ack(Some(returned)) => {
                return Err(format!(
                    "the broker returned the message ({}): no queue is bound to `{EXCHANGE}` \
                     with routing key \"\"; start the consumer first \
                     (`cargo run --example basic_nack`), it declares and binds `msgs`",
                    returned.reply_text
                ));
            }
            Confirmation::Nack(_) => {
                return Err(format!(
                    "the broker nacked message {n} of {}: it was not stored; publish again",
                    args.repeat
                ));
            }
            Confirmation::NotRequested => {
                return Err("the broker did not confirm: publisher confirms are off".into());
            }
        }
        println!(
            "published {:?} to `{EXCHANGE}` ({n}/{}), message_id {id}, confirmed",
            args.body, args.repeat
        );
    }
    let _ = channel.close(200, "OK".into()).await;
    let _ = connection.close(200, "OK".into()).await;
    Ok(())
}
