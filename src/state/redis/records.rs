//! Records with a lifetime on Redis: bindings, owner records, uploads, the
//! per-token indexes that page them, and leader locks.

use super::{
    parse_score, redis, secs, Duration, IndexEntry, RedisStore, StoreError, CLAIM, INDEX_ADD,
    INDEX_PAGE, REPLACE, UNLOCK,
};

impl RedisStore {
    pub(super) async fn touch(
        &self,
        ns: &str,
        id: &str,
        ttl: Duration,
    ) -> Result<Option<String>, StoreError> {
        let key = &self.keys.binding(ns, id);
        self.run(|mut c| async move {
            redis::cmd("GETEX")
                .arg(key)
                .arg("EX")
                .arg(secs(ttl))
                .query_async(&mut c)
                .await
        })
        .await
    }

    pub(super) async fn claim(
        &self,
        ns: &str,
        id: &str,
        value: &str,
        ttl: Duration,
    ) -> Result<(String, bool), StoreError> {
        let key = self.keys.binding(ns, id);
        let (bound, created): (String, i64) = self
            .script(
                &self.claim,
                CLAIM,
                key,
                vec![value.to_string(), secs(ttl).to_string()],
            )
            .await?;
        Ok((bound, created == 1))
    }

    pub(super) async fn replace(
        &self,
        ns: &str,
        id: &str,
        expected: &str,
        value: &str,
        ttl: Duration,
    ) -> Result<String, StoreError> {
        let key = self.keys.binding(ns, id);
        self.script(
            &self.replace,
            REPLACE,
            key,
            vec![
                expected.to_string(),
                value.to_string(),
                secs(ttl).to_string(),
            ],
        )
        .await
    }

    pub(super) async fn put(
        &self,
        ns: &str,
        id: &str,
        value: &str,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let key = &self.keys.binding(ns, id);
        let _: String = self
            .run(|mut c| async move {
                redis::cmd("SET")
                    .arg(key)
                    .arg(value)
                    .arg("EX")
                    .arg(secs(ttl))
                    .query_async(&mut c)
                    .await
            })
            .await?;
        Ok(())
    }

    pub(super) async fn get_many(
        &self,
        ns: &str,
        ids: &[String],
    ) -> Result<Vec<Option<String>>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        // Single-key GETs rather than MGET: the keys are unrelated entities
        // and may live in different Cluster slots.
        let mut cmds = Vec::with_capacity(ids.len());
        for id in ids {
            let mut cmd = redis::cmd("GET");
            cmd.arg(self.keys.binding(ns, id));
            cmds.push(cmd);
        }
        self.fan_out(cmds).await
    }

    pub(super) async fn delete(&self, ns: &str, id: &str) -> Result<(), StoreError> {
        let key = &self.keys.binding(ns, id);
        let _: i64 = self
            .run(|mut c| async move { redis::cmd("DEL").arg(key).query_async(&mut c).await })
            .await?;
        Ok(())
    }

    pub(super) async fn index_add(
        &self,
        name: &str,
        member: &str,
        ttl: Duration,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        let key = self.keys.index(name);
        let _: i64 = self
            .script(
                &self.index_add,
                INDEX_ADD,
                key,
                vec![
                    now_ms.to_string(),
                    (now_ms + ttl.as_millis() as u64).to_string(),
                    member.to_string(),
                ],
            )
            .await?;
        Ok(())
    }

    pub(super) async fn index_add_many(
        &self,
        name: &str,
        members: &[(String, u64)],
        keep: usize,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        if members.is_empty() {
            return Ok(());
        }
        let key = self.keys.index(name);
        let latest = members.iter().map(|(_, e)| *e).max().unwrap_or(now_ms);
        let mut add = redis::cmd("ZADD");
        add.arg(&key);
        for (member, expires_ms) in members {
            add.arg(*expires_ms).arg(member);
        }
        let mut pipe = redis::pipe();
        pipe.add_command(add).ignore();
        pipe.cmd("ZREMRANGEBYSCORE")
            .arg(&key)
            .arg("-inf")
            .arg(now_ms)
            .ignore();
        // Ranks count from the lowest score: all but the `keep` latest.
        pipe.cmd("ZREMRANGEBYRANK")
            .arg(&key)
            .arg(0)
            .arg(-(keep as i64) - 1)
            .ignore();
        // Every record lives as long; the newest batch's expiry is the
        // index's.
        pipe.cmd("PEXPIREAT").arg(&key).arg(latest).ignore();
        // One key, one slot; ZADD of the same members twice is one ZADD.
        let pipe = &pipe;
        self.run(|mut c| async move { pipe.query_async::<()>(&mut c).await })
            .await
    }

    pub(super) async fn index_members(
        &self,
        name: &str,
        now_ms: u64,
    ) -> Result<Vec<String>, StoreError> {
        let key = &self.keys.index(name);
        self.run(|mut c| async move {
            redis::cmd("ZRANGE")
                .arg(key)
                .arg("+inf")
                .arg(format!("({now_ms}"))
                .arg("BYSCORE")
                .arg("REV")
                .query_async(&mut c)
                .await
        })
        .await
    }

    pub(super) async fn index_page(
        &self,
        name: &str,
        now_ms: u64,
        after: Option<&IndexEntry>,
        count: usize,
    ) -> Result<Vec<IndexEntry>, StoreError> {
        if count == 0 {
            return Ok(Vec::new());
        }
        let key = self.keys.index(name);
        let (same, below): (Vec<String>, Vec<String>) = self
            .script(
                &self.index_page,
                INDEX_PAGE,
                key,
                vec![
                    now_ms.to_string(),
                    count.to_string(),
                    after.map_or_else(String::new, |a| a.expires_ms.to_string()),
                ],
            )
            .await?;
        let mut page: Vec<IndexEntry> = match after {
            Some(a) if a.expires_ms > now_ms => same
                .into_iter()
                .filter(|m| m.as_bytes() < a.member.as_bytes())
                .map(|member| IndexEntry {
                    member,
                    expires_ms: a.expires_ms,
                })
                .collect(),
            _ => Vec::new(),
        };
        for pair in below.chunks_exact(2) {
            let expires_ms = parse_score(&pair[1])?;
            page.push(IndexEntry {
                member: pair[0].clone(),
                expires_ms,
            });
        }
        page.truncate(count);
        Ok(page)
    }

    pub(super) async fn index_remove(&self, name: &str, member: &str) -> Result<(), StoreError> {
        let key = &self.keys.index(name);
        let _: i64 = self
            .run(|mut c| async move {
                redis::cmd("ZREM")
                    .arg(key)
                    .arg(member)
                    .query_async(&mut c)
                    .await
            })
            .await?;
        Ok(())
    }

    pub(super) async fn try_lock(
        &self,
        name: &str,
        holder: &str,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        // Held when this holder's value is there: a `SET NX` sent again after
        // its answer was lost finds its own value, not a rival's.
        let key = &self.keys.lock(name);
        self.run(|mut c| async move {
            let set: Option<String> = redis::cmd("SET")
                .arg(key)
                .arg(holder)
                .arg("NX")
                .arg("PX")
                .arg(ttl.as_millis().max(1) as u64)
                .query_async(&mut c)
                .await?;
            if set.is_some() {
                return Ok(true);
            }
            let now: Option<String> = redis::cmd("GET").arg(key).query_async(&mut c).await?;
            Ok(now.as_deref() == Some(holder))
        })
        .await
    }

    pub(super) async fn unlock(&self, name: &str, holder: &str) -> Result<(), StoreError> {
        let key = self.keys.lock(name);
        let _: i64 = self
            .script(&self.unlock, UNLOCK, key, vec![holder.to_string()])
            .await?;
        Ok(())
    }
}
