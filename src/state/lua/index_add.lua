-- Add a member with an expiry score, drop lapsed members, keep the key alive
-- as long as its longest-lived member. KEYS[1] sorted set; ARGV: now ms,
-- expiry ms, member.
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[3])
local ttl = redis.call('PTTL', KEYS[1])
local want = tonumber(ARGV[2]) - tonumber(ARGV[1])
if ttl < want then redis.call('PEXPIRE', KEYS[1], want) end
return 1
