//! One channel request (a declare, `confirm.select`) bounded in time: a
//! broker that never answers (a dead connection) must not hang the start.

use std::future::Future;
use std::time::Duration;

/// Awaits `request` for at most `timeout`; its error, or that `what` went
/// unanswered, as text for an error message.
pub(crate) async fn within<T>(
    timeout: Duration,
    what: &str,
    request: impl Future<Output = lapin::Result<T>>,
) -> Result<T, String> {
    match tokio::time::timeout(timeout, request).await {
        Ok(Ok(answer)) => Ok(answer),
        Ok(Err(error)) => Err(error.to_string()),
        Err(_) => Err(format!(
            "the broker did not answer {what} within {timeout:?} (is the connection alive?)"
        )),
    }
}
