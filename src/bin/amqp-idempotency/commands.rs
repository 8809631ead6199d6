//! The commands that read Redis: inspect, forget and stats, on the
//! library's records API.

use amqp_idempotency::records::State;

use crate::Failure;
use crate::output::{describe, eprint_text, print_text, shell_quote};
use crate::records::{block_on, connect, redis_failure};
use crate::settings::{Settings, Target};

fn no_such_key(key: &str, shown: &str) -> Failure {
    Failure::NotFound(format!(
        "no such key: `{key}` does not exist on {shown} (never claimed, already expired or \
         forgotten; check --prefix and --scope, or run `amqp-idempotency stats`)"
    ))
}

pub(crate) fn inspect(settings: &Settings, target: &Target) -> Result<(), Failure> {
    block_on(async {
        let records = connect(settings).await?;
        let key = target.key(&records);
        let record = records
            .get(&key)
            .await
            .map_err(|err| redis_failure(settings, &err))?;
        print_text(&describe(&key, record.as_ref()));
        if record.is_none() {
            return Err(no_such_key(&key, &records.server()));
        }
        Ok(())
    })
}

pub(crate) fn forget(settings: &Settings, target: &Target, yes: bool) -> Result<(), Failure> {
    block_on(async {
        let records = connect(settings).await?;
        let key = target.key(&records);
        let found = if yes {
            records.forget(&key).await
        } else {
            records.get(&key).await
        }
        .map_err(|err| redis_failure(settings, &err))?;
        let Some(record) = found else {
            return Err(no_such_key(&key, &records.server()));
        };
        let in_progress = matches!(record.state(), State::InProgress { .. });
        let warning = "warning: the record is in progress: if its owner is still running, a \
                       redelivery of this message may now be processed a second time.\n";
        if !yes {
            print_text(&format!("would delete:\n{}", describe(&key, Some(&record))));
            if in_progress {
                eprint_text(warning);
            }
            let same_url = if settings.url_flag {
                " (with the same --redis-url)"
            } else {
                ""
            };
            return Err(Failure::NotFound(format!(
                "refusing to delete without --yes; nothing was changed. To delete it, run:\n    \
                 amqp-idempotency forget {} --yes{same_url}",
                shell_quote(&key)
            )));
        }
        print_text(&format!("deleted:\n{}", describe(&key, Some(&record))));
        if in_progress {
            eprint_text(&warning.replace("is in progress", "was in progress"));
        }
        Ok(())
    })
}

pub(crate) fn stats(settings: &Settings) -> Result<(), Failure> {
    block_on(async {
        let records = connect(settings).await?;
        let scope = settings.scope.as_deref();
        let stats = records
            .stats(scope)
            .await
            .map_err(|err| redis_failure(settings, &err))?;
        print_text(&format!(
            "keys matching {} on {}\n\
             in_progress   {}\n\
             done          {}\n\
             released      {}\n\
             unrecognized  {}\n\
             total         {}\n",
            records.pattern(scope),
            records.server(),
            stats.in_progress,
            stats.done,
            stats.released,
            stats.unrecognized,
            stats.total()
        ));
        Ok(())
    })
}
