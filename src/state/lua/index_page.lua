-- One page of an index, latest expiry first, after a position. KEYS[1]
-- sorted set (score: expiry ms); ARGV: now ms, count, the position's score
-- ('' on the first page). Returns the members that share the position's
-- score (the caller keeps those after the position: members of one score
-- are ordered by their bytes, which Lua's locale-bound comparison is not),
-- and up to count members, with scores, below it.
local same = {}
local top = '+inf'
if ARGV[3] ~= '' then
  same = redis.call('ZRANGE', KEYS[1], ARGV[3], ARGV[3], 'BYSCORE', 'REV')
  top = '(' .. ARGV[3]
end
local below = redis.call('ZRANGE', KEYS[1], top, '(' .. ARGV[1], 'BYSCORE', 'REV',
  'LIMIT', 0, ARGV[2], 'WITHSCORES')
return {same, below}
