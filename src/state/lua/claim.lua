-- SET NX EX, or slide the expiry of the existing binding.
-- KEYS[1] binding; ARGV: value, ttl seconds. Returns {bound value, created 0/1}.
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2]) then
  return {ARGV[1], 1}
end
local cur = redis.call('GET', KEYS[1])
if not cur then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
  return {ARGV[1], 1}
end
redis.call('EXPIRE', KEYS[1], ARGV[2])
return {cur, 0}
