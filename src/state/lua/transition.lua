-- The key-state machine, applied atomically: the twin of `store::apply`.
-- KEYS[1] the ring's state hash, KEYS[2] its counter (absent for a ring
-- that is never rotated). ARGV: now ms, member, field (the member, or
-- member|model), event kind, event number, event reason, the version step.
-- A change adds the step to the counter, so each replica's next rotation
-- sees its copy of the states is old (`state::snapshot`); pruning lapsed
-- cooldowns changes nothing a rotation sees, so it adds nothing.
-- Lapsed cooldowns of the ring are pruned on the way, so per-model entries
-- expire by themselves. Returns {key-wide before, field before, field after}
-- (encoded states, '' for none).
local now = tonumber(ARGV[1])
local member, field, kind = ARGV[2], ARGV[3], ARGV[4]
local num, reason = tonumber(ARGV[5]), ARGV[6]

local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  local v = all[i + 1]
  if string.sub(v, 1, 2) == 'c:' then
    local untils = string.match(v, '^c:(%d+)')
    if untils and tonumber(untils) <= now then redis.call('HDEL', KEYS[1], all[i]) end
  end
end

local key_before = redis.call('HGET', KEYS[1], member) or ''
local before = redis.call('HGET', KEYS[1], field) or ''
local function is_disabled(s) return string.sub(s, 1, 2) == 'd:' end
local function is_cooling(s) return string.sub(s, 1, 2) == 'c:' end
local function is_admin(s) return is_disabled(s) and string.match(s, '^d:%d+:(.*)$') == 'admin' end

local after = before
if kind == 'cool' then
  if not is_disabled(key_before) and not is_disabled(before) then
    local cur = is_cooling(before) and tonumber(string.match(before, '^c:(%d+)')) or nil
    if not (cur and cur >= num) then
      -- A per-minute cooldown keeps the form layout 1 reads (`store::MemberState::encode`).
      if reason == '' or reason == 'per_minute' then after = 'c:' .. ARGV[5] else after = 'c:' .. ARGV[5] .. ':' .. reason end
    end
  end
elseif kind == 'disable' then
  if not (is_disabled(before) and (is_admin(before) or reason ~= 'admin')) then
    after = 'd:' .. ARGV[1] .. ':' .. reason
  end
elseif kind == 'enable' then
  after = ''
elseif kind == 'recovered' then
  if is_disabled(before) and not is_admin(before) then after = '' end
elseif kind == 'lift' then
  if is_cooling(before) then after = '' end
end

if after ~= before then
  if after == '' then redis.call('HDEL', KEYS[1], field) else redis.call('HSET', KEYS[1], field, after) end
  if KEYS[2] then redis.call('INCRBY', KEYS[2], ARGV[7]) end
end
return {key_before, before, after}
