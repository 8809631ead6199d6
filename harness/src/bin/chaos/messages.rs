//! The messages: what is published (plain, duplicated, poison and
//! fingerprint-less messages, shuffled), how fast (background traffic plus
//! bursts before each fault), and the id each one carries for the ledger.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use lapin::message::Delivery;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel};
use tokio::sync::watch;

use crate::options::Options;
use crate::rng::SplitMix;

/// Header naming each message for the ledger; not part of the fingerprint.
pub const ID_HEADER: &str = "x-chaos-id";

/// The id the suite gave a message (header, else `message_id`, else `-`).
pub fn chaos_id(delivery: &Delivery) -> String {
    let header = delivery.properties.headers().as_ref().and_then(|headers| {
        headers
            .inner()
            .iter()
            .find(|(name, _)| name.as_str() == ID_HEADER)
            .and_then(|(_, value)| match value {
                AMQPValue::LongString(s) => {
                    Some(String::from_utf8_lossy(s.as_bytes()).into_owned())
                }
                AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
                _ => None,
            })
    });
    header
        .or_else(|| {
            delivery
                .properties
                .message_id()
                .as_ref()
                .map(|id| id.as_str().to_owned())
        })
        .filter(|id| !id.is_empty() && !id.contains(char::is_whitespace))
        .unwrap_or_else(|| "-".to_owned())
}

pub struct Publication {
    pub id: String,
    pub body: Vec<u8>,
    pub with_message_id: bool,
}

impl Publication {
    pub fn copy(&self) -> Self {
        Self {
            id: self.id.clone(),
            body: self.body.clone(),
            with_message_id: self.with_message_id,
        }
    }

    pub fn properties(&self) -> BasicProperties {
        let mut headers = FieldTable::default();
        headers.insert(
            ID_HEADER.into(),
            AMQPValue::LongString(LongString::from(self.id.as_str())),
        );
        let properties = BasicProperties::default()
            .with_headers(headers)
            .with_content_type("application/json".into());
        if self.with_message_id {
            properties.with_message_id(self.id.as_str().into())
        } else {
            properties
        }
    }
}

/// What is published: plain `m<i>`, poison `p<i>`, transiently failing
/// `t<i>`, fingerprint-less `n<i>`.
pub struct Plan {
    pub publications: Vec<Publication>,
    pub plain: Vec<String>,
    pub poison: Vec<String>,
    /// Their handler fails on the first [`transient_failures`] runs, then succeeds.
    pub transient: Vec<String>,
    pub no_fingerprint: Vec<String>,
    pub duplicates: usize,
}

impl Plan {
    pub fn new(options: &Options, rng: &mut SplitMix) -> Self {
        let n = options.messages;
        let count = |fraction: f64| (n as f64 * fraction).round() as usize;
        let plain: Vec<String> = (0..n).map(|i| format!("m{i}")).collect();
        let poison: Vec<String> = (0..count(options.poison))
            .map(|i| format!("p{i}"))
            .collect();
        let transient: Vec<String> = (0..count(options.transient))
            .map(|i| format!("t{i}"))
            .collect();
        let no_fingerprint: Vec<String> = (0..count(options.no_fingerprint))
            .map(|i| format!("n{i}"))
            .collect();
        let body = |id: &str, rng: &mut SplitMix| {
            format!("{{\"id\":\"{id}\",\"amount\":{}}}", rng.below(100_000)).into_bytes()
        };
        let mut publications = Vec::new();
        // Plain messages first: the duplicates below are picked by index.
        for id in plain.iter().chain(&poison).chain(&transient) {
            publications.push(Publication {
                id: id.clone(),
                body: body(id, rng),
                with_message_id: true,
            });
        }
        for id in &no_fingerprint {
            publications.push(Publication {
                id: id.clone(),
                body: Vec::new(),
                with_message_id: false,
            });
        }
        // A `--duplicates` fraction of the plain messages, published again as
        // is: half of the copies right after the original (a double click,
        // so both are in flight together), half anywhere (a producer retry).
        let mut chosen: Vec<usize> = (0..n).collect();
        rng.shuffle(&mut chosen);
        let duplicates = count(options.duplicates).min(n);
        let mut adjacent = HashSet::new();
        for (k, &i) in chosen[..duplicates].iter().enumerate() {
            if k % 2 == 0 {
                adjacent.insert(publications[i].id.clone());
            } else {
                let copy = publications[i].copy();
                publications.push(copy);
            }
        }
        rng.shuffle(&mut publications);
        let mut ordered = Vec::with_capacity(publications.len() + adjacent.len());
        for publication in publications {
            let twin = adjacent.remove(&publication.id).then(|| publication.copy());
            ordered.push(publication);
            ordered.extend(twin);
        }
        let publications = ordered;
        Self {
            publications,
            plain,
            poison,
            transient,
            no_fingerprint,
            duplicates,
        }
    }

    pub fn unique(&self) -> usize {
        self.plain.len() + self.poison.len() + self.transient.len() + self.no_fingerprint.len()
    }
}

/// How many times the handler fails a transient message `t<i>` before it
/// succeeds: 1 for even `i`, 2 for odd `i` (0 for any other id). Below
/// the consumers' 4 attempts, with room for a crash or a timeout besides.
pub fn transient_failures(id: &str) -> u32 {
    id.strip_prefix('t')
        .and_then(|n| n.parse::<u64>().ok())
        .map_or(0, |n| 1 + u32::from(n % 2 == 1))
}

/// Publishes the plan in order, with confirms, as far as `allowance` allows.
pub async fn publish_all(
    channel: Channel,
    queue: String,
    publications: Vec<Publication>,
    mut allowance: watch::Receiver<usize>,
    published: Arc<AtomicUsize>,
) -> Result<(), String> {
    pub const BATCH: usize = 100;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(|err| format!("cannot enable publisher confirms: {err}"))?;
    let mut next = 0;
    while next < publications.len() {
        let allowed = (*allowance.borrow_and_update()).min(publications.len());
        if allowed <= next {
            allowance
                .changed()
                .await
                .map_err(|_| "the orchestrator stopped publishing".to_owned())?;
            continue;
        }
        let end = allowed.min(next + BATCH);
        let mut confirms = Vec::with_capacity(end - next);
        for publication in &publications[next..end] {
            let confirm = channel
                .basic_publish(
                    "".into(),
                    queue.as_str().into(),
                    BasicPublishOptions::default(),
                    &publication.body,
                    publication.properties(),
                )
                .await
                .map_err(|err| format!("publishing failed: {err}"))?;
            confirms.push(confirm);
        }
        for confirm in confirms {
            let confirmation = confirm
                .await
                .map_err(|err| format!("publisher confirm failed: {err}"))?;
            if !confirmation.is_ack() {
                return Err("the broker nacked a published message".into());
            }
        }
        published.fetch_add(end - next, Ordering::SeqCst);
        next = end;
    }
    Ok(())
}

/// How many messages may be published so far: half of them evenly over
/// `spread` (background traffic), the other half in bursts released just
/// before each fault, so that faults hit consumers with full prefetch
/// windows; whatever is left is released once `spread` has passed.
pub struct Pacer {
    pub total: usize,
    pub spread: Duration,
    pub start: Instant,
    pub burst: usize,
    pub bursts: usize,
    pub allowance: watch::Sender<usize>,
}

impl Pacer {
    pub fn allowed(&self) -> usize {
        if self.spread.is_zero() || self.start.elapsed() >= self.spread {
            return self.total;
        }
        let background = self.start.elapsed().as_secs_f64() / self.spread.as_secs_f64();
        let background = (self.total / 2) as f64 * background;
        (background as usize + self.bursts).min(self.total)
    }

    pub fn tick(&self) {
        let allowed = self.allowed();
        self.allowance.send_if_modified(|current| {
            let grow = allowed > *current;
            if grow {
                *current = allowed;
            }
            grow
        });
    }

    /// Releases a burst; false when everything is published already.
    pub fn burst(&mut self) -> bool {
        if self.allowed() >= self.total {
            return false;
        }
        self.bursts += self.burst;
        self.tick();
        true
    }
}

/// The messages that faults publish: `s<i>`, whose first handler run times
/// out while the work it spawned goes on (`handler-timeout`), and `a<i>`,
/// whose handler aborts its consumer process (`poison-abort`).
pub struct Injected {
    pub channel: Channel,
    pub queue: String,
    pub slow: Vec<String>,
    pub abort: Vec<String>,
}

impl Injected {
    /// Opens publishing on `channel` (confirm mode) to `queue`.
    pub async fn new(channel: Channel, queue: &str) -> Result<Self, String> {
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|err| format!("cannot enable publisher confirms: {err}"))?;
        Ok(Self {
            channel,
            queue: queue.to_owned(),
            slow: Vec::new(),
            abort: Vec::new(),
        })
    }

    /// How many messages were published this way.
    pub fn count(&self) -> usize {
        self.slow.len() + self.abort.len()
    }

    pub async fn publish_slow(&mut self) -> Result<String, String> {
        let id = format!("s{}", self.slow.len());
        self.publish(&id).await?;
        self.slow.push(id.clone());
        Ok(id)
    }

    pub async fn publish_abort(&mut self) -> Result<String, String> {
        let id = format!("a{}", self.abort.len());
        self.publish(&id).await?;
        self.abort.push(id.clone());
        Ok(id)
    }

    async fn publish(&self, id: &str) -> Result<(), String> {
        let publication = Publication {
            id: id.to_owned(),
            body: format!("{{\"id\":\"{id}\"}}").into_bytes(),
            with_message_id: true,
        };
        let confirmation = self
            .channel
            .basic_publish(
                "".into(),
                self.queue.as_str().into(),
                BasicPublishOptions::default(),
                &publication.body,
                publication.properties(),
            )
            .await
            .map_err(|err| format!("publishing {id} failed: {err}"))?
            .await
            .map_err(|err| format!("publisher confirm for {id} failed: {err}"))?;
        if confirmation.is_ack() {
            Ok(())
        } else {
            Err(format!("the broker nacked {id}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transient_messages_fail_once_or_twice() {
        assert_eq!(transient_failures("t0"), 1);
        assert_eq!(transient_failures("t7"), 2);
        assert_eq!(transient_failures("m7"), 0);
        assert_eq!(transient_failures("t"), 0);
    }
}
