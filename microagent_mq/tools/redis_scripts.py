"""Lua run inside Redis, where a multi-key step must be atomic."""

# Move due members of a delayed sorted set into the stream. KEYS: zset, stream.
# ARGV: now (ms), most to move. A member is a JSON array of stream field/value pairs.
# Atomic: a message is either still delayed or in the stream, never both or neither.
MOVE_DUE = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
for _, member in ipairs(due) do
    local fields = cjson.decode(member)
    if fields[6] == '1' then
        redis.call('XADD', KEYS[2], '*', fields[1], fields[2], fields[3], fields[4])
    else
        redis.call('XADD', KEYS[2], '*', fields[1], fields[2], fields[3], fields[4],
                   fields[5], fields[6])
    end
end
if #due > 0 then
    redis.call('ZREM', KEYS[1], unpack(due))
end
return #due
"""

# Append many messages to one stream in one command. KEYS: stream. ARGV: body, id, body, id...
# One command with 2N arguments costs the client far less than N XADD commands.
ADD_MANY = """
for i = 1, #ARGV, 2 do
    redis.call('XADD', KEYS[1], '*', 'body', ARGV[i], 'id', ARGV[i + 1])
end
return #ARGV / 2
"""
