-- One round-robin step over the usable members of a ring.
-- KEYS[1] counter, KEYS[2] member states (hash); ARGV: now ms, member count,
-- members..., excluded members...
-- Returns {index, 0}, {-1, earliest cooldown end} (all cooling),
-- {-2, 0} (all disabled) or {-3, 0} (only excluded members are usable).
local now = tonumber(ARGV[1])
local n = tonumber(ARGV[2])
local members = {}
for i = 1, n do members[i] = ARGV[2 + i] end
local excluded = {}
for i = 3 + n, #ARGV do excluded[ARGV[i]] = true end
local states = redis.call('HMGET', KEYS[2], unpack(members))
local usable = {}
local min_until = nil
local excluded_usable = false
for i = 1, n do
  local s = states[i]
  local ok = true
  if s then
    local kind = string.sub(s, 1, 1)
    if kind == 'd' then
      ok = false
    elseif kind == 'c' then
      local u = tonumber(string.sub(s, 3))
      if u and u > now then
        ok = false
        if min_until == nil or u < min_until then min_until = u end
      end
    end
  end
  if ok then
    if excluded[members[i]] then excluded_usable = true else usable[#usable + 1] = i end
  end
end
if #usable == 0 then
  if excluded_usable then return {-3, 0} end
  if min_until then return {-1, tostring(min_until)} end
  return {-2, 0}
end
local c = redis.call('INCR', KEYS[1])
return {usable[((c - 1) % #usable) + 1] - 1, 0}
