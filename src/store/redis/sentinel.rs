//! Redis Sentinel: asking the sentinels of a `redis-sentinel://` URL
//! ([`SentinelUrl`], parsed in config) where the master is, for every new
//! connection (so a failover is followed), and for the records API.
//!
//! ```no_run
//! use amqp_idempotency::{Config, store::RedisStore};
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let config = Config::default().with_redis_url("redis-sentinel://10.0.0.5:26379#orders");
//! let store = RedisStore::connect(&config).await?;
//! # Ok(())
//! # }
//! ```

use redis::{AsyncConnectionConfig, Cmd};

use super::connect::client_for;
use crate::config::SentinelUrl;
use crate::error::redact_url;

impl SentinelUrl {
    /// `SENTINEL get-master-addr-by-name <master>`.
    pub(super) fn question(&self) -> Cmd {
        let mut question = redis::cmd("SENTINEL");
        question.arg("get-master-addr-by-name").arg(&self.master);
        question
    }

    /// The master's URL from one sentinel's `reply`, or a problem naming
    /// that sentinel.
    pub(super) fn answer(
        &self,
        sentinel: &str,
        reply: Result<Option<(String, u16)>, String>,
    ) -> Result<String, String> {
        match reply {
            Ok(Some((host, port))) => Ok(self.master_url(&host, port)),
            Ok(None) => Err(format!(
                "{}: it monitors no master named `{}`",
                redact_url(sentinel),
                self.master
            )),
            Err(problem) => Err(format!("{}: {problem}", redact_url(sentinel))),
        }
    }

    /// What to say when no sentinel named the master.
    pub(super) fn unanswered(&self, problems: &[String]) -> String {
        format!(
            "no sentinel named the master `{}` ({}); are the sentinels up, and is the name \
             after `#` in REDIS_URL the one in their `sentinel monitor` line?",
            self.master,
            problems.join("; ")
        )
    }

    /// Asks each sentinel in turn where the master is; the first answer wins.
    pub(crate) async fn master(&self, config: &AsyncConnectionConfig) -> Result<String, String> {
        let mut problems = Vec::new();
        for sentinel in &self.sentinels {
            let reply = async {
                let client = client_for(sentinel, &self.tls_files)?;
                let mut connection = client
                    .get_multiplexed_async_connection_with_config(config)
                    .await
                    .map_err(|err| err.to_string())?;
                self.question()
                    .query_async(&mut connection)
                    .await
                    .map_err(|err| err.to_string())
            };
            match self.answer(sentinel, reply.await) {
                Ok(url) => return Ok(url),
                Err(problem) => problems.push(problem),
            }
        }
        Err(self.unanswered(&problems))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sentinel_urls_parse() {
        let url = SentinelUrl::parse("redis-sentinel://u:p@a:26380,b,[::1]:5/2#orders").unwrap();
        assert_eq!(
            url.sentinels,
            ["redis://a:26380", "redis://b:26379", "redis://[::1]:5"]
        );
        assert_eq!(url.master, "orders");
        assert_eq!(
            url.master_url("10.0.0.9", 6380),
            "redis://u:p@10.0.0.9:6380/2"
        );
        let tls = SentinelUrl::parse("rediss-sentinel://s1:26379#m").unwrap();
        assert_eq!(tls.sentinels, ["rediss://s1:26379"]);
        assert_eq!(tls.master_url("::1", 1), "rediss://[::1]:1");
        for bad in [
            "redis://a:1#m",
            "redis-sentinel://a:1",
            "redis-sentinel://a:1#",
            "redis-sentinel://#m",
            "redis-sentinel://a:1/x#m",
        ] {
            assert!(SentinelUrl::parse(bad).is_err(), "{bad}");
        }
        let err = SentinelUrl::parse("redis-sentinel://u:secret@a:1").unwrap_err();
        assert!(!err.contains("secret"), "{err}");
        let err = SentinelUrl::parse("redis-sentinel://idem:s3cr#t@s1:26379").unwrap_err();
        assert!(!err.contains("s3cr"), "{err}");
        let hashed = SentinelUrl::parse("redis-sentinel://idem:s3cr#t@s1:26379#m").unwrap();
        assert_eq!(hashed.master, "m");
        assert_eq!(hashed.sentinels, ["redis://s1:26379"]);
    }
}
