-- Compare-and-set: replace the binding only if it holds ARGV[1] (or is gone).
-- KEYS[1] binding; ARGV: expected, value, ttl seconds. Returns the bound value.
local cur = redis.call('GET', KEYS[1])
if cur and cur ~= ARGV[1] then
  redis.call('EXPIRE', KEYS[1], ARGV[3])
  return cur
end
redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
return ARGV[2]
