//! The queues of a run: the work queue, its dead-letter exchange and
//! dead-letter queue, and with `--outbox` the downstream queue the handlers
//! publish to through the outbox (declared by the orchestrator and again by
//! each consumer on every reconnect), how many messages are ready, and what
//! the dead-letter and downstream queues hold at the end.

use std::collections::{BTreeMap, HashMap};

use lapin::options::{
    BasicGetOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Channel, ExchangeKind};

use crate::messages::chaos_id;

/// Queues left behind by an aborted run disappear after an hour unused.
const QUEUE_EXPIRY_MS: i32 = 3_600_000;

/// The queue, its dead-letter exchange and dead-letter queue, and with
/// `--outbox` the downstream queue.
#[derive(Clone, Debug)]
pub struct Topology {
    pub queue: String,
    pub dlx: String,
    pub dead: String,
    /// `{queue}.downstream`, with `--outbox`: where each handler's outgoing
    /// message goes (through the default exchange).
    pub downstream: Option<String>,
}

impl Topology {
    pub fn new(queue: &str, outbox: bool) -> Self {
        Self {
            queue: queue.to_owned(),
            dlx: format!("{queue}.dlx"),
            dead: format!("{queue}.dead"),
            downstream: outbox.then(|| format!("{queue}.downstream")),
        }
    }

    /// Declares everything; consumers run it again on every reconnect.
    pub async fn declare(&self, channel: &Channel) -> Result<(), lapin::Error> {
        let expiry = || {
            let mut args = FieldTable::default();
            args.insert("x-expires".into(), AMQPValue::LongInt(QUEUE_EXPIRY_MS));
            args
        };
        channel
            .exchange_declare(
                self.dlx.as_str().into(),
                ExchangeKind::Fanout,
                ExchangeDeclareOptions {
                    auto_delete: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
        channel
            .queue_declare(
                self.dead.as_str().into(),
                QueueDeclareOptions::default(),
                expiry(),
            )
            .await?;
        channel
            .queue_bind(
                self.dead.as_str().into(),
                self.dlx.as_str().into(),
                "".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        if let Some(downstream) = &self.downstream {
            // Declared before any consumer consumes: the outbox publishes
            // with `mandatory`, so an unroutable message would be requeued.
            channel
                .queue_declare(
                    downstream.as_str().into(),
                    QueueDeclareOptions::default(),
                    expiry(),
                )
                .await?;
        }
        let mut args = expiry();
        args.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString(LongString::from(self.dlx.as_str())),
        );
        channel
            .queue_declare(
                self.queue.as_str().into(),
                QueueDeclareOptions::default(),
                args,
            )
            .await?;
        Ok(())
    }

    pub async fn delete(&self, channel: &Channel) {
        for queue in [
            Some(&self.queue),
            Some(&self.dead),
            self.downstream.as_ref(),
        ]
        .into_iter()
        .flatten()
        {
            if let Err(err) = channel
                .queue_delete(queue.as_str().into(), Default::default())
                .await
            {
                eprintln!("cannot delete queue {queue}: {err}");
            }
        }
        // Auto-deleted with its last binding; this is for the odd case it is not.
        let _ = channel
            .exchange_delete(self.dlx.as_str().into(), Default::default())
            .await;
    }
}

pub async fn ready_count(channel: &Channel, queue: &str) -> Result<u32, lapin::Error> {
    let queue = channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    Ok(queue.message_count())
}

/// What the dead-letter queue held at the end.
#[derive(Default)]
pub struct DeadLetters {
    pub total: usize,
    pub ids: HashMap<String, usize>,
    /// `x-idempotency-outcome` of each copy (`x-death only` when absent).
    pub outcomes: BTreeMap<String, usize>,
    /// The outcome of each message's (last) copy.
    pub outcome_of: HashMap<String, String>,
}

pub async fn read_dead_letters(
    channel: &Channel,
    queue: &str,
) -> Result<DeadLetters, lapin::Error> {
    let mut letters = DeadLetters::default();
    while let Some(message) = channel
        .basic_get(queue.into(), BasicGetOptions { no_ack: true })
        .await?
    {
        let delivery = &message.delivery;
        letters.total += 1;
        let id = chaos_id(delivery);
        *letters.ids.entry(id.clone()).or_default() += 1;
        let outcome = delivery
            .properties
            .headers()
            .as_ref()
            .and_then(|headers| {
                headers
                    .inner()
                    .iter()
                    .find(|(name, _)| name.as_str() == "x-idempotency-outcome")
                    .map(|(_, value)| match value {
                        AMQPValue::LongString(s) => {
                            String::from_utf8_lossy(s.as_bytes()).into_owned()
                        }
                        other => format!("{other:?}"),
                    })
            })
            .unwrap_or_else(|| "x-death only".to_owned());
        *letters.outcomes.entry(outcome.clone()).or_default() += 1;
        letters.outcome_of.insert(id, outcome);
    }
    Ok(letters)
}

/// What the downstream queue held at the end (`--outbox`).
#[derive(Default)]
pub struct Downstream {
    pub total: usize,
    /// Copies received per `message_id`.
    pub ids: HashMap<String, usize>,
    /// Messages that came without a `message_id`.
    pub without_id: usize,
}

/// Empties the downstream queue, counting its messages by `message_id`.
pub async fn read_downstream(channel: &Channel, queue: &str) -> Result<Downstream, lapin::Error> {
    let mut downstream = Downstream::default();
    while let Some(message) = channel
        .basic_get(queue.into(), BasicGetOptions { no_ack: true })
        .await?
    {
        downstream.total += 1;
        match message.delivery.properties.message_id() {
            Some(id) => *downstream.ids.entry(id.as_str().to_owned()).or_default() += 1,
            None => downstream.without_id += 1,
        }
    }
    Ok(downstream)
}
