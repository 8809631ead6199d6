//! A batch of requests laid out as one pipeline: each command answers one
//! request, except the token-checked transitions (see `scripts`), which
//! travel together as one script call, answered key by key.
//!
//! ```ignore
//! let packed = Packed::new(batch, Keys::Declared); // standalone: keys declared
//! let answers = send(&packed.pipe).await?;         // one reply per command
//! packed.answer(answers, shortfall.as_ref(), |request, answer| ...);
//! ```

use redis::{Cmd, RedisResult, Value};

use super::errors::Failure;
use super::scripts::{Keys, transitions_call};
use super::{Kind, Request};

/// A batch as a pipeline, and which requests each of its commands answers.
pub(super) struct Packed {
    /// One for each command of the pipeline, in order.
    targets: Vec<Target>,
    /// Some request writes (a `WAIT` after them is due when asked for).
    pub(super) writes: bool,
}

enum Target {
    /// A command answering one request.
    One(Request),
    /// A script call answering these transitions, key by key.
    Script(Cmd, Vec<Request>),
}

impl Packed {
    /// `requests` as one pipeline, their transitions as one script call at
    /// the place of the first (requests that wait together were issued
    /// independently, so any order between them is one they could have
    /// had). `keys`: how the script call names its keys.
    pub(super) fn new(requests: Vec<Request>, keys: Keys) -> Self {
        let mut targets = Vec::with_capacity(requests.len());
        let mut transitions = Vec::new();
        let mut script_at = None;
        let mut writes = false;
        for request in requests {
            writes |= request.kind != Kind::Read;
            if request.kind == Kind::Transition {
                script_at.get_or_insert(targets.len());
                transitions.push(request);
            } else {
                targets.push(Target::One(request));
            }
        }
        if let Some(at) = script_at {
            let call = transitions_call(transitions.iter().map(|request| &request.cmd), keys);
            targets.insert(at, Target::Script(call, transitions));
        }
        Self { targets, writes }
    }

    /// The number of commands, and of answers expected (before any `WAIT`).
    pub(super) fn len(&self) -> usize {
        self.targets.len()
    }

    /// The commands, in order.
    pub(super) fn commands(&self) -> impl Iterator<Item = &Cmd> {
        self.targets.iter().map(|target| match target {
            Target::One(request) => &request.cmd,
            Target::Script(call, _) => call,
        })
    }

    /// Hands each request its answer from `answers` (one per command):
    /// `answered(request, answer)`; a write's answer is `shortfall` when the
    /// replicas did not confirm the writes.
    pub(super) fn answer(
        self,
        answers: impl IntoIterator<Item = RedisResult<Value>>,
        shortfall: Option<&Failure>,
        mut answered: impl FnMut(Request, RedisResult<Value>),
    ) {
        for (target, answer) in self.targets.into_iter().zip(answers) {
            match target {
                Target::One(request) => match (answer, shortfall) {
                    (Ok(_), Some(short)) if request.kind != Kind::Read => {
                        let _ = request.reply.send(Err(short.clone()));
                    }
                    (answer, _) => answered(request, answer),
                },
                Target::Script(_, requests) => {
                    each_key(requests, answer, shortfall, &mut answered);
                }
            }
        }
    }

    /// Every request, answered with `failure`.
    pub(super) fn fail(self, failure: &Failure) {
        for request in self.into_requests() {
            let _ = request.reply.send(Err(failure.clone()));
        }
    }

    /// The requests.
    pub(super) fn into_requests(self) -> impl Iterator<Item = Request> {
        self.targets.into_iter().flat_map(|target| match target {
            Target::One(request) => vec![request],
            Target::Script(_, requests) => requests,
        })
    }
}

/// Splits a script call's answer into its keys' answers: an array with
/// one reply per key (a number, or the error of that key alone).
fn each_key(
    requests: Vec<Request>,
    answer: RedisResult<Value>,
    shortfall: Option<&Failure>,
    answered: &mut impl FnMut(Request, RedisResult<Value>),
) {
    let items = match answer {
        Ok(Value::Array(items)) if items.len() == requests.len() => items,
        Ok(other) => {
            let failure = Failure::unavailable(format!(
                "the transition script answered {other:?} for {} keys; is REDIS_URL a Redis 7 \
                 (or newer) server?",
                requests.len()
            ));
            for request in requests {
                let _ = request.reply.send(Err(failure.clone()));
            }
            return;
        }
        Err(err) => {
            // The whole call failed (NOSCRIPT, OOM, READONLY, ...): it is
            // every key's answer.
            for request in requests {
                answered(request, Err(err.clone()));
            }
            return;
        }
    };
    for (request, item) in requests.into_iter().zip(items) {
        match (item, shortfall) {
            (Value::ServerError(err), _) => answered(request, Err(err.into())),
            (_, Some(short)) => {
                let _ = request.reply.send(Err(short.clone()));
            }
            (item, None) => answered(request, Ok(item)),
        }
    }
}

/// The answer of one key's script call made alone (an array of one reply),
/// as that key's answer.
pub(super) fn alone(answer: RedisResult<Value>) -> RedisResult<Value> {
    match answer? {
        Value::Array(mut items) if items.len() == 1 => match items.pop() {
            Some(Value::ServerError(err)) => Err(err.into()),
            Some(item) => Ok(item),
            None => Ok(Value::Nil),
        },
        other => Ok(other),
    }
}
