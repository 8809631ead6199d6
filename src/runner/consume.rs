//! The consume loop: takes deliveries while slots are free, checks the
//! service's readiness with the delivery in hand, hands each to a task of
//! its own ([`deliver`](super::deliver)), and stops on shutdown or when the
//! consumer fails.

use std::sync::Arc;
use std::time::Duration;

use futures_util::{FutureExt, StreamExt};
use lapin::Consumer;
use lapin::message::Delivery;
use lapin::options::BasicCancelOptions;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tower::{Service, ServiceExt};

use super::CLOSE_TIMEOUT;
use super::copy::MessageCopy;
use super::dead_letter::DeadLetters;
use super::deliver::{self, Copies, Settling};
use super::options::{FRAME_MAX_FLOOR, ServeOptions};
use super::retry::Retries;
use super::settle::Settler;
use super::shutdown::{Finish, stop_signal};
use crate::error::{BoxError, ServeError};
use crate::outcome::{Disposition, Outcome};
use crate::report::{ServeReport, Tally};

/// Consumes `consumer` with `service` until the consumer is cancelled, it
/// fails, or shutdown is asked for.
///
/// At most `concurrency` deliveries are in flight. Each one's [`Outcome`]
/// is turned into ack / nack(requeue) / reject only after the service
/// returned, that is after its store write; the `bool` lapin answers is
/// checked and a delivery that could not be settled is counted as
/// unsettled (the broker redelivers it). A handler that panics is treated
/// as a retryable failure. Acks of consecutive finished deliveries share
/// one `multiple=true` frame; give `serve` a channel of its own (one
/// consumer per channel), otherwise it notices the foreign delivery tags
/// and acks one by one. On shutdown the consumer is cancelled, handlers
/// in flight get the deadline to finish, abandoned ones have their claims
/// released, and the channel (if given) is closed.
pub async fn serve<S>(
    consumer: Consumer,
    service: S,
    options: ServeOptions,
) -> Result<ServeReport, ServeError>
where
    S: Service<Delivery, Response = Outcome> + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    let tally = Arc::new(Tally::default());
    let (result, _finishing) = run(consumer, service, options, Arc::clone(&tally)).await;
    result.map(|()| tally.snapshot())
}

/// Serves until stopped. When the consumer failed, the handlers still in
/// flight finish in the background: the returned task, which counts into
/// `tally` as they do.
pub(super) async fn run<S>(
    mut consumer: Consumer,
    mut service: S,
    options: ServeOptions,
    tally: Arc<Tally>,
) -> (Result<(), ServeError>, Option<tokio::task::JoinHandle<()>>)
where
    S: Service<Delivery, Response = Outcome> + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    let ServeOptions {
        concurrency,
        shutdown,
        signals,
        shutdown_deadline,
        dead_letters,
        channel,
        close_channel,
        frame_max,
        retry,
        retry_schedule,
    } = options;
    let queue = consumer.queue().to_string();
    let frame_max = frame_max.unwrap_or(FRAME_MAX_FLOOR);
    let prepared = DeadLetters::prepare(&dead_letters, channel.as_ref(), &queue, frame_max).await;
    let dead_letters = match prepared {
        Ok(dead_letters) => dead_letters,
        Err(err) => return (Err(err), None),
    };
    let prepared =
        Retries::prepare(retry, &retry_schedule, channel.as_ref(), &queue, frame_max).await;
    let retries = match prepared {
        Ok(retries) => retries,
        Err(err) => return (Err(err), None),
    };
    let copies = Arc::new(Copies {
        dead_letters,
        retries,
    });
    let mut shutdown = stop_signal(shutdown, signals);
    let slots = Arc::new(Semaphore::new(concurrency));
    let (mut settler, settling) = Settler::start(Arc::clone(&tally));
    // One settler per channel incarnation: delivery tags restart at 1 after
    // lapin's automatic recovery.
    let mut settlings = vec![settling];
    let mut last_tag = 0;
    let (stopping_tx, stopping) = watch::channel(false);
    let mut tasks = JoinSet::new();

    let result = loop {
        while let Some(joined) = tasks.try_join_next() {
            log_join(joined);
        }
        let slot = tokio::select! {
            biased;
            () = &mut shutdown => {
                                break Ok(());
            }
            slot = Arc::clone(&slots).acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => break Ok(()),
            },
        };
        let next = tokio::select! {
            biased;
            () = &mut shutdown => {
                                break Ok(());
            }
            next = consumer.next() => next,
        };
        let delivery = match next {
            None => {
                tracing::info!(queue = %consumer.queue(), "consumer cancelled");
                break Ok(());
            }
            Some(Err(err)) => {
                let Some(channel) = channel.as_ref().filter(|_| err.can_be_recovered()) else {
                    tracing::error!(error = %err, "consumer failed");
                    break Err(ServeError::Consumer(err));
                };
                // With ConnectionProperties::enable_auto_recover, lapin
                // reconnects and restarts the consumer; without it this
                // returns the error at once.
                tracing::warn!(error = %err, "the consumer's channel failed; waiting for lapin's automatic recovery");
                let recovered = tokio::select! {
                    biased;
                    () = &mut shutdown => {
                                                break Ok(());
                    }
                    recovered = channel.wait_for_recovery(err) => recovered,
                };
                match recovered {
                    Ok(()) => {
                        tracing::info!(
                            "channel recovered: consuming again; deliveries from before the failure are never acked on the new channel, the broker redelivers them"
                        );
                        settler = next_epoch(&tally, &mut settlings);
                        // Tags restart at 1 on the recovered channel.
                        last_tag = 0;
                        continue;
                    }
                    Err(err) => {
                        tracing::error!(error = %err, "consumer failed");
                        break Err(ServeError::Consumer(err));
                    }
                }
            }
            Some(Ok(delivery)) => delivery,
        };
        if delivery.delivery_tag <= last_tag {
            // Tags start again at 1: lapin recovered the channel without a
            // word on the stream. Earlier deliveries belong to the old one.
            tracing::info!(
                "the channel was recovered: consuming again; deliveries from before are never acked on the new channel, the broker redelivers them"
            );
            settler = next_epoch(&tally, &mut settlings);
        }
        last_tag = delivery.delivery_tag;
        settler.open(delivery.delivery_tag);
        // Readiness is checked with the delivery in hand: while the store
        // is down the layer stays pending, and this delivery waits here
        // instead of bouncing through the broker.
        let ready = tokio::select! {
            biased;
            () = &mut shutdown => None,
            ready = service.ready() => Some(ready.map(drop)),
        };
        match ready {
            Some(Ok(())) => {}
            Some(Err(err)) => {
                return_to_queue(&settler, delivery);
                break Err(ServeError::Service(err.into()));
            }
            None => {
                return_to_queue(&settler, delivery);
                break Ok(());
            }
        }
        let acker = delivery.acker.clone();
        let tag = delivery.delivery_tag;
        // Only kept when dead letters or retries are republished.
        let copy = copies.wanted().then(|| MessageCopy {
            routing_key: delivery.routing_key.clone(),
            properties: delivery.properties.clone(),
            data: delivery.data.clone(),
        });
        // A delivery the layer holds (the store refusing writes) is given
        // back once the runner stops, instead of holding up the shutdown.
        let call = crate::stopping::scope(stopping.clone(), service.call(delivery));
        let settler = settler.clone();
        let stopping = stopping.clone();
        tasks.spawn(deliver::settle(
            call,
            Settling {
                tag,
                acker,
                copy,
                copies: Arc::clone(&copies),
                settler,
                stopping,
                slot,
            },
        ));
    };

    // Stop taking deliveries and give back the ones that were on their way.
    // With the channel: cancel, then return whatever arrives until the
    // stream ends. Without it: return what is buffered; the rest comes back
    // when the channel closes.
    let cancelled = match &channel {
        Some(channel) if result.is_ok() => {
            let cancel = channel.basic_cancel(consumer.tag(), BasicCancelOptions::default());
            matches!(
                tokio::time::timeout(CLOSE_TIMEOUT, cancel).await,
                Ok(Ok(()))
            )
        }
        _ => false,
    };
    if cancelled {
        let drain = async {
            while let Some(Ok(delivery)) = consumer.next().await {
                settler.open(delivery.delivery_tag);
                return_to_queue(&settler, delivery);
            }
        };
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, drain).await;
    } else {
        while let Some(Some(Ok(delivery))) = consumer.next().now_or_never() {
            settler.open(delivery.delivery_tag);
            return_to_queue(&settler, delivery);
        }
    }
    drop(consumer);
    let _ = stopping_tx.send(true);
    let finish = Finish {
        tasks,
        settler,
        settlings,
        tally: Arc::clone(&tally),
        shutdown_deadline,
    };
    let finishing = if result.is_ok() {
        finish.run().await;
        None
    } else {
        // The consumer failed (connection or channel lost): the handlers in
        // flight finish in the background (their Redis writes matter; their
        // acks cannot reach the broker, which redelivers those messages)
        // while the caller reconnects. Never aborted for a mere reconnect.
        let running = finish.tasks.len();
        if running > 0 {
            tracing::info!(
                running,
                "the consumer stopped: its handlers in flight finish in the background"
            );
        }
        Some(tokio::spawn(finish.run()))
    };
    if let Some(channel) = channel.filter(|_| close_channel)
        && let Ok(Err(err)) =
            tokio::time::timeout(CLOSE_TIMEOUT, channel.close(200, "OK".into())).await
    {
        tracing::warn!(error = %err, "closing the channel failed");
    }
    tracing::info!(report = ?tally.snapshot(), "runner stopped");
    (result, finishing)
}

/// Starts the settler of a recovered channel (its delivery tags start
/// again at 1, so they must never be coalesced with the old ones) and
/// counts the recovery.
fn next_epoch(tally: &Arc<Tally>, settlings: &mut Vec<tokio::task::JoinHandle<()>>) -> Settler {
    let (settler, settling) = Settler::start(Arc::clone(tally));
    settlings.push(settling);
    tally.add(|r| r.reconnects += 1);
    settler
}

/// Gives a delivery that was never handed to the service back to the broker.
fn return_to_queue(settler: &Settler, delivery: Delivery) {
    let requeue = Disposition::Requeue {
        after: Duration::ZERO,
    };
    settler.settle(
        delivery.delivery_tag,
        delivery.acker,
        requeue,
        requeue,
        None,
    );
}

pub(super) fn log_join(joined: Result<(), tokio::task::JoinError>) {
    if let Err(err) = joined
        && !err.is_cancelled()
    {
        tracing::error!(error = %err, "delivery task failed");
    }
}
