-- One admission of a client against its limits (state::limits). Every limit
-- is checked before any is counted: a refused request spends nothing.
-- KEYS: 1 request log (sorted set, score = admission ms), 2 tokens by second
-- (hash), 3 tokens of the day (string), 4 the lease set asked for (sorted
-- set, score = expiry ms).
-- ARGV: 1 now ms, 2 rpm, 3 tpm, 4 tokens per day, 5 end of the day ms,
-- 6 lease limit, 7 lease id, 8 lease expiry ms, 9 request id, 10 the lease
-- limit's code, 11… leases of that set this replica released and has not
-- written yet (removed first); a limit of 0 is none.
-- Answers {0} when admitted, else {code, retry ms, used, allowed}.
local now = tonumber(ARGV[1])
local rpm, tpm, per_day = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local lease_limit = tonumber(ARGV[6])
if per_day > 0 then
  local used = tonumber(redis.call('GET', KEYS[3]) or '0')
  if used >= per_day then
    return {3, math.max(tonumber(ARGV[5]) - now, 0), used, per_day}
  end
end
if tpm > 0 then
  local first = math.floor(now / 1000) - 59
  local fields = redis.call('HGETALL', KEYS[2])
  local used, oldest = 0, nil
  for i = 1, #fields, 2 do
    local second = tonumber(fields[i])
    if second >= first then
      used = used + tonumber(fields[i + 1])
      if oldest == nil or second < oldest then oldest = second end
    else
      redis.call('HDEL', KEYS[2], fields[i])
    end
  end
  if used >= tpm then
    -- At most a minute: tokens settled by a replica whose clock ran ahead
    -- (or whose settle came after this admission was timed) free within one.
    return {2, math.min(math.max((oldest + 60) * 1000 - now, 0), 60000), used, tpm}
  end
end
if lease_limit > 0 then
  for i = 11, #ARGV do redis.call('ZREM', KEYS[4], ARGV[i]) end
  redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now)
  local held = redis.call('ZCARD', KEYS[4])
  if held >= lease_limit then
    return {tonumber(ARGV[10]), 1000, held, lease_limit}
  end
end
if rpm > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - 60000)
  local used = redis.call('ZCARD', KEYS[1])
  if used >= rpm then
    local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
    return {1, math.min(math.max(tonumber(oldest[2]) + 60000 - now, 0), 60000), used, rpm}
  end
  redis.call('ZADD', KEYS[1], now, ARGV[9])
  redis.call('PEXPIRE', KEYS[1], 60000)
end
if lease_limit > 0 then
  local until_ms = tonumber(ARGV[8])
  redis.call('ZADD', KEYS[4], until_ms, ARGV[7])
  local ttl = redis.call('PTTL', KEYS[4])
  if ttl < until_ms - now then redis.call('PEXPIRE', KEYS[4], until_ms - now) end
end
return {0}
