//! The key pool's rings on Redis: rotation (one `INCR`, the states read
//! again only when their version moved), the per-model windows, and every
//! key state change through `transition.lua`.

use super::{
    decode_states, effective_state, redis, state_field, Applied, HashMap, KeySettle, KeyWindow,
    KeyWindowUse, MemberState, Pick, RedisStore, StoreError, Transition, WindowAsk, MINUTE_MS,
    ROTATE_WITHIN, TRANSITION, VERSION_STEP, WINDOW_MARGIN_MS,
};

impl RedisStore {
    pub(super) async fn rotate(
        &self,
        ring: &str,
        members: &[String],
        exclude: &[String],
        model: Option<&str>,
        now_ms: u64,
    ) -> Result<Pick, StoreError> {
        if members.is_empty() {
            return Ok(Pick::AllDisabled);
        }
        // One command: the counter's next value, which carries the ring's
        // state version (see [`crate::state::snapshot`]). The states are read again
        // only when this replica's copy is not at that version. The pick
        // itself is the rule the embedded store applies too.
        let counter = &self.keys.ring_counter(ring);
        let next: u64 = self
            .run(|mut c| async move { redis::cmd("INCR").arg(counter).query_async(&mut c).await })
            .await?;
        let snapshot = match self.snapshots.current(ring, next) {
            Some(kept) => kept,
            None => {
                let states = &self.keys.ring_states(ring);
                let raw: HashMap<String, String> = self
                    .run(|mut c| async move {
                        redis::cmd("HGETALL").arg(states).query_async(&mut c).await
                    })
                    .await?;
                self.snapshots.keep(ring, next, decode_states(raw))
            }
        };
        let states: Vec<Option<MemberState>> = members
            .iter()
            .map(|m| effective_state(&snapshot.states, m, model, now_ms))
            .collect();
        Ok(crate::state::choose(
            members,
            &states,
            exclude,
            now_ms,
            || next,
        ))
    }

    pub(super) async fn rotate_within(
        &self,
        ring: &str,
        members: &[String],
        exclude: &[String],
        windows: &[KeyWindow],
        ask: &WindowAsk<'_>,
        now_ms: u64,
    ) -> Result<Pick, StoreError> {
        if members.is_empty() {
            return Ok(Pick::AllDisabled);
        }
        let k = &self.keys;
        let mut keys = Vec::with_capacity(2 + members.len() * 3);
        keys.push(k.ring_counter(ring).into_owned());
        keys.push(k.ring_states(ring).into_owned());
        let mut args = Vec::with_capacity(4 + members.len() * 6);
        args.push(now_ms.to_string());
        args.push(ask.day_ends_ms.to_string());
        args.push(ask.request_id.to_string());
        args.push((MINUTE_MS + WINDOW_MARGIN_MS).to_string());
        for (i, member) in members.iter().enumerate() {
            let w = windows.get(i).copied().unwrap_or_default();
            keys.push(k.window_requests(ring, ask.model, member));
            keys.push(k.window_tokens(ring, ask.model, member));
            keys.push(k.window_day(ring, ask.model, member, ask.day));
            args.push(member.clone());
            args.push(state_field(member, Some(ask.model)));
            args.push(w.rpm.to_string());
            args.push(w.tpm.to_string());
            args.push(w.rpd.to_string());
            args.push(if exclude.contains(member) { "1" } else { "0" }.to_string());
        }
        let answer: Vec<u64> = self
            .script_on(&self.rotate_within, ROTATE_WITHIN, keys, args)
            .await?;
        let corrupt = || StoreError::Corrupt("the rotation script's answer".into());
        Ok(match answer.as_slice() {
            [0, i] => Pick::Member(usize::try_from(*i).map_err(|_| corrupt())?),
            [1, until_ms] => Pick::AllCooling {
                until_ms: *until_ms,
            },
            [2] => Pick::AllDisabled,
            [3] => Pick::Exhausted,
            [4, until_ms] => Pick::WindowsFull {
                until_ms: *until_ms,
            },
            _ => return Err(corrupt()),
        })
    }

    pub(super) async fn settle_keys(
        &self,
        ring: &str,
        settles: &[KeySettle],
        now_ms: u64,
    ) -> Result<(), StoreError> {
        if settles.is_empty() {
            return Ok(());
        }
        let second = (now_ms / 1000).to_string();
        let mut pipe = redis::pipe();
        for s in settles {
            let key = self.keys.window_tokens(ring, &s.model, &s.member);
            pipe.cmd("HINCRBY")
                .arg(&key)
                .arg(&second)
                .arg(s.tokens)
                .ignore();
            pipe.cmd("PEXPIRE")
                .arg(&key)
                .arg(MINUTE_MS + WINDOW_MARGIN_MS)
                .ignore();
        }
        // Every key of one ring shares its slot: one pipeline, one master.
        let pipe = &pipe;
        self.run_once(|mut c| async move { pipe.query_async::<()>(&mut c).await })
            .await
    }

    pub(super) async fn key_windows(
        &self,
        ring: &str,
        members: &[String],
        ask: &WindowAsk<'_>,
        now_ms: u64,
    ) -> Result<Vec<KeyWindowUse>, StoreError> {
        let after = format!("({}", now_ms.saturating_sub(MINUTE_MS + WINDOW_MARGIN_MS));
        let mut cmds = Vec::with_capacity(members.len() * 3);
        for m in members {
            let mut count = redis::cmd("ZCOUNT");
            count
                .arg(self.keys.window_requests(ring, ask.model, m))
                .arg(&after)
                .arg("+inf");
            let mut tokens = redis::cmd("HGETALL");
            tokens.arg(self.keys.window_tokens(ring, ask.model, m));
            let mut day = redis::cmd("GET");
            day.arg(self.keys.window_day(ring, ask.model, m, ask.day));
            cmds.extend([count, tokens, day]);
        }
        let answers: Vec<redis::Value> = self.fan_out(cmds).await?;
        let corrupt = || StoreError::Corrupt("a key window's counts".into());
        let first_second = (now_ms / 1000).saturating_sub(59);
        answers
            .chunks(3)
            .map(|c| {
                let [count, tokens, day] = c else {
                    return Err(corrupt());
                };
                let int = |v: &redis::Value| -> Result<u64, StoreError> {
                    Ok(redis::from_redis_value::<Option<u64>>(v.clone())
                        .map_err(|_| corrupt())?
                        .unwrap_or(0))
                };
                let tokens: HashMap<u64, u64> =
                    redis::from_redis_value(tokens.clone()).map_err(|_| corrupt())?;
                Ok(KeyWindowUse {
                    requests_last_minute: int(count)?,
                    tokens_last_minute: tokens
                        .iter()
                        .filter(|(s, _)| **s >= first_second)
                        .map(|(_, n)| n)
                        .sum(),
                    requests_today: int(day)?,
                })
            })
            .collect()
    }

    pub(super) async fn member_states(
        &self,
        ring: &str,
    ) -> Result<HashMap<String, MemberState>, StoreError> {
        let states = &self.keys.ring_states(ring);
        let raw: HashMap<String, String> = self
            .run(|mut c| async move { redis::cmd("HGETALL").arg(states).query_async(&mut c).await })
            .await?;
        Ok(decode_states(raw))
    }

    pub(super) async fn transition(
        &self,
        ring: &str,
        member: &str,
        model: Option<&str>,
        event: &Transition,
        now_ms: u64,
    ) -> Result<Applied, StoreError> {
        // The counter rides along: a change adds to it the step that tells
        // every replica's rotation its copy of the states is old. The
        // proxies' ring is never rotated: it has no counter to write.
        let mut keys = vec![self.keys.ring_states(ring).into_owned()];
        if ring != crate::state::keyspace::ring::PROXIES {
            keys.push(self.keys.ring_counter(ring).into_owned());
        }
        let field = state_field(member, model);
        let (kind, num, reason) = event.wire();
        let (key_before, before, after): (String, String, String) = self
            .script_on(
                &self.transition,
                TRANSITION,
                keys,
                vec![
                    now_ms.to_string(),
                    member.to_string(),
                    field,
                    kind.to_string(),
                    num.to_string(),
                    reason.to_string(),
                    VERSION_STEP.to_string(),
                ],
            )
            .await?;
        Ok(Applied {
            key_before: MemberState::decode(&key_before),
            before: MemberState::decode(&before),
            after: MemberState::decode(&after),
        })
    }
}
