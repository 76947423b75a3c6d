//! Counters and client limits on Redis: statistics buckets, the atomic
//! admission of `admit.lua`, token settling, leases and a client's use.

use super::{
    parse_score, redis, secs, Ask, ClientUse, Duration, HashMap, Held, LeaseSet, Limit, RedisStore,
    Resend, Settle, StoreError, Verdict, ADMIT, MINUTE_MS,
};

impl RedisStore {
    pub(super) async fn add_counts(
        &self,
        bucket: &str,
        counts: &[(String, u64)],
        ttl: Duration,
    ) -> Result<(), StoreError> {
        if counts.is_empty() {
            return Ok(());
        }
        let key = self.keys.stats(bucket);
        let mut pipe = redis::pipe();
        for (name, n) in counts {
            pipe.cmd("HINCRBY").arg(&key).arg(name).arg(*n).ignore();
        }
        pipe.cmd("EXPIRE").arg(&key).arg(secs(ttl)).ignore();
        let pipe = &pipe;
        self.run_once(|mut c| async move { pipe.query_async::<()>(&mut c).await })
            .await
    }

    pub(super) async fn read_counts(
        &self,
        buckets: &[String],
    ) -> Result<HashMap<String, u64>, StoreError> {
        if buckets.is_empty() {
            return Ok(HashMap::new());
        }
        // One bucket per minute, each in its own slot.
        let mut cmds = Vec::with_capacity(buckets.len());
        for b in buckets {
            let mut cmd = redis::cmd("HGETALL");
            cmd.arg(self.keys.stats(b));
            cmds.push(cmd);
        }
        let all: Vec<HashMap<String, u64>> = self.fan_out(cmds).await?;
        let mut sum = HashMap::new();
        for counts in all {
            for (name, n) in counts {
                *sum.entry(name).or_insert(0) += n;
            }
        }
        Ok(sum)
    }

    pub(super) async fn admit(&self, client: &str, ask: &Ask<'_>) -> Result<Verdict, StoreError> {
        let k = &self.keys;
        let set = ask.lease.as_ref().map_or(LeaseSet::Concurrent, |l| l.set);
        let keys = vec![
            k.client_requests(client),
            k.client_tokens(client),
            k.client_day(client, ask.day),
            k.client_leases(client, set.name()),
        ];
        let lease = ask.lease.as_ref();
        let mut args = vec![
            ask.now_ms.to_string(),
            ask.rpm.unwrap_or(0).to_string(),
            ask.tpm.unwrap_or(0).to_string(),
            ask.per_day.unwrap_or(0).to_string(),
            ask.day_ends_ms.to_string(),
            lease.map_or(0, |l| l.limit).to_string(),
            lease.map_or("", |l| l.id).to_string(),
            lease.map_or(0, |l| l.until_ms).to_string(),
            ask.request_id.to_string(),
            set.limit().code().to_string(),
        ];
        if lease.is_some() {
            args.extend(ask.released.iter().cloned());
        }
        // Sent again on a fresh connection, it finds its own entries (same
        // ids), so it can refuse itself at the edge of a limit, never admit
        // twice.
        let answer: Vec<u64> = self.script_on(&self.admit, ADMIT, keys, args).await?;
        match answer.as_slice() {
            [0] => Ok(Verdict::Admitted),
            [code, retry_ms, used, allowed] => Ok(Verdict::Refused {
                limit: Limit::from_code(*code)
                    .ok_or_else(|| StoreError::Corrupt("the admission script's answer".into()))?,
                retry_ms: *retry_ms,
                used: *used,
                allowed: *allowed,
            }),
            _ => Err(StoreError::Corrupt("the admission script's answer".into())),
        }
    }

    pub(super) async fn settle(&self, settles: &[Settle], now_ms: u64) -> Result<(), StoreError> {
        let second = (now_ms / 1000).to_string();
        let mut cmds = Vec::with_capacity(settles.len() * 4);
        for s in settles {
            let tokens = self.keys.client_tokens(&s.client);
            let day = self.keys.client_day(&s.client, &s.day);
            if s.per_minute {
                // Stale seconds are dropped by the admission script, which
                // reads this hash whenever the client has `tpm`.
                let mut add = redis::cmd("HINCRBY");
                add.arg(&tokens).arg(&second).arg(s.tokens);
                let mut keep = redis::cmd("PEXPIRE");
                keep.arg(&tokens).arg(MINUTE_MS + 1000);
                cmds.extend([add, keep]);
            }
            let mut add_day = redis::cmd("INCRBY");
            add_day.arg(&day).arg(s.tokens);
            let mut keep_day = redis::cmd("EXPIRE");
            keep_day.arg(&day).arg(2 * 86_400);
            cmds.extend([add_day, keep_day]);
        }
        let _: Vec<redis::Value> = self.fan_out_as(Resend::Never, cmds).await?;
        Ok(())
    }

    pub(super) async fn leases(
        &self,
        release: &[Held],
        renew: &[Held],
        until_ms: u64,
    ) -> Result<(), StoreError> {
        let mut cmds = Vec::with_capacity(release.len() + renew.len());
        for h in release {
            let mut cmd = redis::cmd("ZREM");
            cmd.arg(self.keys.client_leases(&h.client, h.set.name()))
                .arg(&h.id);
            cmds.push(cmd);
        }
        for h in renew {
            let key = self.keys.client_leases(&h.client, h.set.name());
            // Not `XX`: a lease that lapsed while Redis could not be
            // reached is put back, its request still being in flight.
            let mut cmd = redis::cmd("ZADD");
            cmd.arg(&key).arg(until_ms).arg(&h.id);
            cmds.push(cmd);
            let mut keep = redis::cmd("PEXPIREAT");
            keep.arg(&key).arg(until_ms);
            cmds.push(keep);
        }
        let _: Vec<redis::Value> = self.fan_out(cmds).await?;
        Ok(())
    }

    pub(super) async fn client_use(
        &self,
        client: &str,
        day: &str,
        now_ms: u64,
    ) -> Result<ClientUse, StoreError> {
        let k = &self.keys;
        let requests = k.client_requests(client);
        let after = format!("({}", now_ms.saturating_sub(MINUTE_MS));
        let live_after = format!("({now_ms}");
        let mut count = redis::cmd("ZCOUNT");
        count.arg(&requests).arg(&after).arg("+inf");
        let mut oldest = redis::cmd("ZRANGEBYSCORE");
        oldest
            .arg(&requests)
            .arg(&after)
            .arg("+inf")
            .arg("WITHSCORES")
            .arg("LIMIT")
            .arg(0)
            .arg(1);
        let mut tokens = redis::cmd("HGETALL");
        tokens.arg(k.client_tokens(client));
        let mut today = redis::cmd("GET");
        today.arg(k.client_day(client, day));
        let mut concurrent = redis::cmd("ZCOUNT");
        concurrent
            .arg(k.client_leases(client, LeaseSet::Concurrent.name()))
            .arg(&live_after)
            .arg("+inf");
        let mut live = redis::cmd("ZCOUNT");
        live.arg(k.client_leases(client, LeaseSet::Live.name()))
            .arg(&live_after)
            .arg("+inf");
        let answers: Vec<redis::Value> = self
            .fan_out(vec![count, oldest, tokens, today, concurrent, live])
            .await?;
        let corrupt = || StoreError::Corrupt("a client's limit counts".into());
        let [count, oldest, tokens, today, concurrent, live] =
            <[redis::Value; 6]>::try_from(answers).map_err(|_| corrupt())?;
        let int = |v: redis::Value| -> Result<u64, StoreError> {
            Ok(redis::from_redis_value::<Option<u64>>(v)
                .map_err(|_| corrupt())?
                .unwrap_or(0))
        };
        let oldest: Vec<(String, String)> =
            redis::from_redis_value(oldest).map_err(|_| corrupt())?;
        let tokens: HashMap<u64, u64> = redis::from_redis_value(tokens).map_err(|_| corrupt())?;
        let first_second = (now_ms / 1000).saturating_sub(59);
        Ok(ClientUse {
            requests_last_minute: int(count)?,
            requests_free_at_ms: match oldest.first() {
                Some((_, score)) => Some(parse_score(score)? + MINUTE_MS),
                None => None,
            },
            tokens_last_minute: tokens
                .iter()
                .filter(|(second, _)| **second >= first_second)
                .map(|(_, n)| n)
                .sum(),
            tokens_today: int(today)?,
            concurrent: int(concurrent)?,
            live_sessions: int(live)?,
        })
    }
}
