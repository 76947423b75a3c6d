-- One rotation step that keeps every key within its window for a model
-- (state::StateStore::rotate_within): the rule of state::choose, with a key
-- whose window is full passed over as a cooling one is, and the request
-- counted in the window of the key picked.
-- KEYS: 1 the ring's counter, 2 its states; then per member 3 keys: its
-- request log (sorted set, score = ms), tokens by second (hash), requests
-- of the day (string).
-- ARGV: 1 now ms, 2 end of the day ms, 3 request id, 4 the window's span
-- ms; then per member 6 values: id, its per-model state field, rpm, tpm,
-- rpd (0: none), excluded (1/0).
-- Answers {0, index (0-based)}, {1, until} all cooling, {2} all disabled,
-- {3} exhausted, {4, until} windows full.
local now, day_end, rid, span = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4])
local n = (#ARGV - 4) / 6
local raw = redis.call('HGETALL', KEYS[2])
local states = {}
for i = 1, #raw, 2 do states[raw[i]] = raw[i + 1] end
-- 'd' for disabled, the end of an active cooldown, or nil.
local function active(v)
  if v == nil then return nil end
  local kind = string.sub(v, 1, 2)
  if kind == 'd:' then return 'd' end
  if kind == 'c:' then
    local u = tonumber(string.match(v, '^c:(%d+)'))
    if u ~= nil and u > now then return u end
  end
  return nil
end
local usable, min_cool, min_free, excluded_usable = {}, nil, nil, false
for i = 0, n - 1 do
  local a = 5 + i * 6
  local member, field = ARGV[a], ARGV[a + 1]
  local rpm, tpm, rpd = tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4])
  local excluded = ARGV[a + 5] == '1'
  local key_wide, per_model = active(states[member]), active(states[field])
  local until_ms = nil
  if key_wide ~= 'd' and per_model ~= 'd' then
    if key_wide ~= nil then until_ms = key_wide end
    if per_model ~= nil and (until_ms == nil or per_model > until_ms) then until_ms = per_model end
    if until_ms == nil and not excluded then
      local log, tokens, day = KEYS[3 + i * 3], KEYS[4 + i * 3], KEYS[5 + i * 3]
      local free = nil
      if rpd > 0 and tonumber(redis.call('GET', day) or '0') >= rpd then free = day_end end
      if free == nil and rpm > 0 then
        redis.call('ZREMRANGEBYSCORE', log, '-inf', now - span)
        if redis.call('ZCARD', log) >= rpm then
          local oldest = redis.call('ZRANGE', log, 0, 0, 'WITHSCORES')
          free = tonumber(oldest[2]) + span
        end
      end
      if free == nil and tpm > 0 then
        local first = math.floor(now / 1000) - 59
        local fields = redis.call('HGETALL', tokens)
        local used, oldest = 0, nil
        for j = 1, #fields, 2 do
          local second = tonumber(fields[j])
          if second >= first then
            used = used + tonumber(fields[j + 1])
            if oldest == nil or second < oldest then oldest = second end
          else
            redis.call('HDEL', tokens, fields[j])
          end
        end
        if used >= tpm then free = (oldest + 60) * 1000 end
      end
      if free ~= nil then
        if min_free == nil or free < min_free then min_free = free end
        until_ms = free
      end
    end
    if until_ms ~= nil then
      if min_cool == nil or until_ms < min_cool then min_cool = until_ms end
    elseif excluded then
      excluded_usable = true
    else
      usable[#usable + 1] = i
    end
  end
end
if #usable == 0 then
  if excluded_usable then return {3} end
  if min_cool ~= nil then
    if min_free ~= nil and min_free == min_cool then return {4, min_free} end
    return {1, min_cool}
  end
  return {2}
end
local c = redis.call('INCR', KEYS[1])
local pick = usable[((c - 1) % #usable) + 1]
local a = 5 + pick * 6
local rpm, rpd = tonumber(ARGV[a + 2]), tonumber(ARGV[a + 4])
if rpm > 0 then
  local log = KEYS[3 + pick * 3]
  redis.call('ZADD', log, now, rid)
  redis.call('PEXPIRE', log, span)
end
if rpd > 0 then
  local day = KEYS[5 + pick * 3]
  redis.call('INCR', day)
  redis.call('PEXPIREAT', day, day_end + 3600000)
end
return {0, pick}
