//! `replay`: moves parked messages back to the queue they were
//! dead-lettered from, after the fix. Dry run by default, bounded by
//! `--count`; each message is republished with confirms and acked in the
//! parking queue only once the broker confirmed the copy.

use std::time::Duration;

use amqp_idempotency::Config;
use amqp_idempotency::amqp::{Published, publish_confirmed};
use lapin::ConnectionProperties;
use lapin::options::{BasicAckOptions, BasicGetOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};

use crate::Failure;

/// What `replay` was asked to do.
#[derive(Debug)]
pub(crate) struct Replay {
    /// The broker (`AMQP_URL`, `AMQP_TLS_*`, or `--amqp-url`).
    pub(crate) config: Config,
    /// The parking queue to read.
    pub(crate) from: String,
    /// Overrides the queue named in each message's `x-idempotency-queue`.
    pub(crate) to: Option<String>,
    /// At most this many messages.
    pub(crate) count: usize,
    /// Without it, nothing moves.
    pub(crate) yes: bool,
}

/// How long one broker request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// The headers the runner adds to a dead letter, removed on the way back.
/// (`x-idempotency-headers-dropped` stays: it says what the message lost.)
const REASON_HEADERS: [&str; 4] = [
    "x-idempotency-outcome",
    "x-idempotency-reason",
    "x-idempotency-attempts",
    "x-idempotency-queue",
];

/// What a replay printed, and how many messages a dry run would move.
#[derive(Debug)]
pub(crate) struct Done {
    pub(crate) report: String,
    pub(crate) would_move: usize,
}

pub(crate) fn run(replay: &Replay) -> Result<Done, Failure> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|err| Failure::Amqp(format!("cannot start an async runtime: {err}")))?;
    runtime.block_on(replay_async(replay))
}

fn amqp_failure(replay: &Replay, what: &str, err: impl std::fmt::Display) -> Failure {
    Failure::Amqp(format!(
        "{what} on RabbitMQ at {}: {err}",
        broker(replay.config.amqp_url())
    ))
}

/// The broker's address for messages, without the credentials.
fn broker(url: &str) -> String {
    match url.parse::<lapin::uri::AMQPUri>() {
        Ok(uri) => format!("{}:{}", uri.authority.host, uri.authority.port),
        Err(_) => "the broker of AMQP_URL (or --amqp-url)".into(),
    }
}

async fn within<T, E: std::fmt::Display>(
    replay: &Replay,
    what: &str,
    request: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, Failure> {
    match tokio::time::timeout(REQUEST_TIMEOUT, request).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(err)) => Err(amqp_failure(replay, what, err)),
        Err(_) => Err(amqp_failure(replay, what, "no answer in time")),
    }
}

fn text(value: &AMQPValue) -> Option<String> {
    match value {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

async fn replay_async(replay: &Replay) -> Result<Done, Failure> {
    let connection = within(
        replay,
        "cannot connect",
        amqp_idempotency::amqp::connect(&replay.config, ConnectionProperties::default()),
    )
    .await?;
    let channel = within(replay, "cannot open a channel", connection.create_channel()).await?;
    within(
        replay,
        "cannot enable publisher confirms",
        channel.confirm_select(ConfirmSelectOptions::default()),
    )
    .await?;
    let mut report = String::new();
    let mut moved = 0usize;
    let mut seen = 0usize;
    while seen < replay.count {
        let message = within(
            replay,
            &format!("cannot read the parking queue `{}`", replay.from),
            channel.basic_get(replay.from.as_str().into(), BasicGetOptions::default()),
        )
        .await?;
        let Some(message) = message else { break };
        seen += 1;
        let delivery = message.delivery;
        let headers = delivery.properties.headers().clone().unwrap_or_default();
        let header = |name: &str| {
            headers
                .inner()
                .iter()
                .find(|(k, _)| k.as_str() == name)
                .and_then(|(_, v)| text(v))
        };
        let target = replay.to.clone().or_else(|| header("x-idempotency-queue"));
        let id = delivery
            .properties
            .message_id()
            .as_ref()
            .map_or_else(|| "(no message_id)".to_owned(), |id| id.to_string());
        let why = header("x-idempotency-outcome").unwrap_or_else(|| "?".into());
        let Some(target) = target else {
            report.push_str(&format!(
                "skipped {id}: no x-idempotency-queue header; pass --to <QUEUE>\n"
            ));
            continue;
        };
        if !replay.yes {
            report.push_str(&format!(
                "would move {id} ({why}) from {} to {target}\n",
                replay.from
            ));
            continue;
        }
        let mut cleaned = FieldTable::default();
        for (name, value) in headers.inner() {
            if !REASON_HEADERS.contains(&name.as_str()) {
                cleaned.insert(name.clone(), value.clone());
            }
        }
        // The one header replay adds is a queue name, which AMQP caps at
        // 255 bytes: within the 1 KiB every added header keeps to; with the
        // reason headers gone, the copy is smaller than the parked one was.
        cleaned.insert(
            "x-idempotency-replayed-from".into(),
            AMQPValue::LongString(LongString::from(replay.from.as_str())),
        );
        let properties = delivery.properties.clone().with_headers(cleaned);
        let published = publish_confirmed(
            &channel,
            "",
            &target,
            &delivery.data,
            properties,
            REQUEST_TIMEOUT,
        )
        .await;
        match published {
            Published::Confirmed => {}
            Published::Failed(_) | Published::Unconfirmed(_) => {
                let what = format!("cannot publish {id} to `{target}`");
                return Err(amqp_failure(replay, &what, published));
            }
            // Returned or refused: left in the parking queue, where it
            // returns when the channel closes.
            _ => {
                return Err(Failure::Amqp(format!(
                    "{report}the broker did not take {id} into `{target}` ({published}); \
                     it stays in `{}`. Moved {moved} before it.",
                    replay.from
                )));
            }
        }
        within(
            replay,
            &format!("cannot ack {id} in `{}`", replay.from),
            delivery.acker.ack(BasicAckOptions::default()),
        )
        .await?;
        moved += 1;
        report.push_str(&format!(
            "moved {id} ({why}) from {} to {target}\n",
            replay.from
        ));
    }
    // Unacked (dry run) messages return to the parking queue.
    let _ = tokio::time::timeout(REQUEST_TIMEOUT, channel.close(200, "OK".into())).await;
    let _ = tokio::time::timeout(REQUEST_TIMEOUT, connection.close(200, "OK".into())).await;
    if seen == 0 {
        report.push_str(&format!("`{}` is empty: nothing to move\n", replay.from));
    } else if replay.yes {
        report.push_str(&format!("moved {moved} message(s)\n"));
    }
    let would_move = if replay.yes { 0 } else { seen };
    Ok(Done { report, would_move })
}
