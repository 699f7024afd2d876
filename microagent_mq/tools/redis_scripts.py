"""Lua run inside Redis, where a step must be atomic or safe to run twice.

redis-py retries a command whose connection dropped, even when Redis had already run it and
only the reply was lost. Every write here is therefore idempotent: a send checks a dedupe
mark first, a settlement acts only on an entry still pending for its consumer.
"""

from collections.abc import Iterable, Sequence
from typing import Any

from redis.asyncio.client import Pipeline
from redis.exceptions import NoScriptError

SENT_MARK_TTL_S = 300  # far beyond redis-py's retries of one send

# Mark a publish as done, once: a bit of a sender's bitmap (KEYS[1]), kept SENT_MARK_TTL_S.
# Returns false when the publish already ran (a retry after a lost reply).
_FIRST_TIME = f"""
local function first_time(mark, offset)
    if redis.call('SETBIT', mark, offset, 1) == 1 then
        return false
    end
    redis.call('EXPIRE', mark, {SENT_MARK_TTL_S})
    return true
end
"""

# One plain message to one stream. KEYS: mark, stream. ARGV: bit, body, id, ts.
SEND_ONE = _FIRST_TIME + """
if not first_time(KEYS[1], ARGV[1]) then return 0 end
redis.call('XADD', KEYS[2], '*', 'body', ARGV[2], 'id', ARGV[3], 'ts', ARGV[4])
return 1
"""

# One message with metadata (a typed message's type): as SEND_ONE, plus ARGV[5] = headers JSON.
SEND_ONE_HEADERS = _FIRST_TIME + """
if not first_time(KEYS[1], ARGV[1]) then return 0 end
redis.call('XADD', KEYS[2], '*', 'body', ARGV[2], 'id', ARGV[3], 'ts', ARGV[4], 'headers', ARGV[5])
return 1
"""

# Any batch, all or nothing. KEYS: mark, then the target keys. ARGV: bit, records:
#   'P', key index, count, ts, then count x (body, id)       plain messages to a stream
#   'F', key index, due ms (0: now), n, then n field values  one entry, or a delayed member
# A delayed member is the JSON array of the entry's fields, in a sorted set scored by due ms.
# RECORDS writes the records from ARGV[i] on (shared with the checked publish, whose entries
# of queues with priorities take ids of the queue's clock: {XADD}(key, ...) adds an entry).
RECORDS = """
while i <= #ARGV do
    local key = KEYS[tonumber(ARGV[i + 1])]
    if ARGV[i] == 'P' then
        local count = tonumber(ARGV[i + 2])
        local ts = ARGV[i + 3]
        local j = i + 4
        for _ = 1, count do
            {XADD}(key, 'body', ARGV[j], 'id', ARGV[j + 1], 'ts', ts)
            j = j + 2
        end
        i = j
    else
        local n = tonumber(ARGV[i + 3])
        local fields = {unpack(ARGV, i + 4, i + 3 + n)}
        if ARGV[i + 2] == '0' then
            {XADD}(key, unpack(fields))
        else
            redis.call('ZADD', key, ARGV[i + 2], cjson.encode(fields))
        end
        i = i + 4 + n
    end
end
"""

PUBLISH = _FIRST_TIME + """
if not first_time(KEYS[1], ARGV[1]) then return 0 end
local i = 2
""" + RECORDS.replace('{XADD}(key, ', "redis.call('XADD', key, '*', ") + """
return 1
"""

_OWNED = """
local function owned(stream, group, me, id)
    local p = redis.call('XPENDING', stream, group, id, id, 1)
    return #p == 1 and p[1][2] == me, p[1]
end
"""

# Settle a message this consumer holds: store its next form, then ack and delete it.
# KEYS: stream, target (stream, delayed set or dead letters). ARGV: group, me, entry id,
# due ms (0: now), fields... Does nothing (returns 0) when the entry is no longer pending
# for this consumer: settled already (a retried command) or taken over by another.
SETTLE = _OWNED + """
if not owned(KEYS[1], ARGV[1], ARGV[2], ARGV[3]) then return 0 end
local fields = {unpack(ARGV, 5)}
if ARGV[4] == '0' then
    redis.call('XADD', KEYS[2], '*', unpack(fields))
else
    redis.call('ZADD', KEYS[2], ARGV[4], cjson.encode(fields))
end
redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
"""
# On a queue with retention the settled entry stays (acked) in its stream, for history.
SETTLE_KEEP = SETTLE + 'return 1\n'
SETTLE += """redis.call('XDEL', KEYS[1], ARGV[3])
return 1
"""

# Renew this consumer's hold on entries (reset their idle time, no delivery counted), only
# those it still owns. KEYS: stream. ARGV: group, me, ids... Returns the ids it lost.
RENEW = _OWNED + """
local lost = {}
for i = 3, #ARGV do
    if owned(KEYS[1], ARGV[1], ARGV[2], ARGV[i]) then
        redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
    else
        lost[#lost + 1] = ARGV[i]
    end
end
return lost
"""

# Give entries back as if never delivered to this consumer: idle for ages (claimed at once
# by anyone) and this consumer's delivery uncounted. Skips entries not owned or already
# released, so running it twice changes nothing. KEYS: stream. ARGV: group, me, idle, ids...
RELEASE = _OWNED + """
local idle = tonumber(ARGV[3])
local released = 0
for i = 4, #ARGV do
    local mine, p = owned(KEYS[1], ARGV[1], ARGV[2], ARGV[i])
    if mine and p[3] < idle / 2 then
        redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'IDLE', idle,
                   'RETRYCOUNT', math.max(p[4] - 1, 0), 'JUSTID')
        released = released + 1
    end
end
return released
"""

# Take over entries idle for at least ARGV[3] ms (released, or their consumer died).
# KEYS: stream. ARGV: group, me, min idle, most, idle of a released entry. Returns
# {id, fields, deliveries before this claim, state}: state 0 abandoned by another consumer,
# 1 this consumer's own, 2 released. An entry deleted from the stream is dropped from the
# pending list: there is nothing left to deliver.
CLAIM = """
local pending = redis.call('XPENDING', KEYS[1], ARGV[1], 'IDLE', ARGV[3], '-', '+', ARGV[4])
local out = {}
for _, p in ipairs(pending) do
    local claimed = redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[3], p[1])
    local entry = claimed[1]
    if entry and entry[2] then
        local state = 0
        if p[3] >= tonumber(ARGV[5]) then
            state = 2
        elseif p[2] == ARGV[2] then
            state = 1
        end
        out[#out + 1] = {entry[1], entry[2], p[4], state}
    else
        redis.call('XACK', KEYS[1], ARGV[1], p[1])
    end
end
return out
"""

# Move due members of a delayed sorted set into the stream. KEYS: zset, stream.
# ARGV: now (ms), most to move. A member is a JSON array of stream field/value pairs.
# Atomic: a message is either still delayed or in the stream, never both or neither.
MOVE_DUE = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
for _, member in ipairs(due) do
    redis.call('XADD', KEYS[2], '*', unpack(cjson.decode(member)))
end
for i = 1, #due, 1000 do
    redis.call('ZREM', KEYS[1], unpack(due, i, math.min(i + 999, #due)))
end
return #due
"""

# Messages waiting in a queue: in the stream and not pending for a consumer, or released
# by one (pending, idle for ages), or delayed and due. KEYS: stream, delayed set.
# ARGV: group, now ms, idle of a released entry.
LENGTH = """
local waiting = redis.call('XLEN', KEYS[1])
local summary = redis.pcall('XPENDING', KEYS[1], ARGV[1])
if type(summary) == 'table' and not summary.err then
    waiting = waiting - summary[1]
    local start = '-'
    while true do
        local page = redis.call('XPENDING', KEYS[1], ARGV[1], 'IDLE', tonumber(ARGV[3]) / 2,
                                start, '+', 1000)
        waiting = waiting + #page
        if #page < 1000 then break end
        start = '(' .. page[#page][1]
    end
end
return waiting + redis.call('ZCOUNT', KEYS[2], '-inf', ARGV[2])
"""

# Move the dead letters with ids in [ARGV[1], ARGV[2]] (at most ARGV[3]) back into the
# stream as first attempts. KEYS: dead letters, then the queue's stream of each priority
# level (just its stream without priorities). ARGV[4]: a field marking the entry as a copy
# ('' for none: on a queue with retention, history lists the original only).
# Returns {moved, last id read}. Moving deletes, so running it twice moves nothing twice.
REQUEUE = """
local entries = redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[2], 'COUNT', ARGV[3])
for _, entry in ipairs(entries) do
    local fields = {}
    local key = KEYS[2]
    local f = entry[2]
    for i = 1, #f, 2 do
        if f[i] == 'body' or f[i] == 'id' or f[i] == 'ts' or f[i] == 'headers'
                or f[i] == 'priority' then
            fields[#fields + 1] = f[i]
            fields[#fields + 1] = f[i + 1]
        end
        if f[i] == 'priority' then
            key = KEYS[math.min(2 + (tonumber(f[i + 1]) or 0), #KEYS)]
        end
    end
    if ARGV[4] ~= nil and ARGV[4] ~= '' then
        fields[#fields + 1] = ARGV[4]
        fields[#fields + 1] = '1'
    end
    redis.call('XADD', key, '*', unpack(fields))
    redis.call('XDEL', KEYS[1], entry[1])
end
if #entries == 0 then return {0, ''} end
return {#entries, entries[#entries][1]}
"""

# Forget consumers idle for ARGV[2] ms with nothing pending (dead processes). Only those:
# deleting a consumer drops its pending entries. KEYS: stream. ARGV: group, min idle.
TIDY = """
local gone = 0
local ok, consumers = pcall(redis.call, 'XINFO', 'CONSUMERS', KEYS[1], ARGV[1])
if not ok then return 0 end
for _, c in ipairs(consumers) do
    local info = {}
    for i = 1, #c, 2 do info[c[i]] = c[i + 1] end
    if info['pending'] == 0 and info['idle'] >= tonumber(ARGV[2]) then
        redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], info['name'])
        gone = gone + 1
    end
end
return gone
"""


class Script:
    """A script run by its SHA; one the server does not know yet is run (and so cached) by EVAL.

    Not redis-py's fallback, SCRIPT LOAD: on a cluster that goes to every master, so one dead
    master would fail the scripts of queues on the live ones.
    """

    def __init__(self, client: Any, text: str) -> None:
        self._registered = client.register_script(text)  # pipelines load it before they run
        self._client = client
        self.script = text
        self.sha: str = self._registered.sha

    async def __call__(self, keys: Sequence[Any] = (), args: Iterable[Any] = (),
                       client: Any = None) -> Any:
        if isinstance(client, Pipeline):
            return await self._registered(keys=keys, args=args, client=client)
        client = client or self._client
        try:
            return await client.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            return await client.eval(self.script, len(keys), *keys, *args)


class Scripts:
    """Every script, registered on one client (cached by the server on first use)."""

    def __init__(self, client: Any) -> None:
        self.send_one = Script(client, SEND_ONE)
        self.send_one_headers = Script(client, SEND_ONE_HEADERS)
        self.publish = Script(client, PUBLISH)
        self.settle = Script(client, SETTLE)
        self.settle_keep = Script(client, SETTLE_KEEP)
        self.renew = Script(client, RENEW)
        self.release = Script(client, RELEASE)
        self.claim = Script(client, CLAIM)
        self.move_due = Script(client, MOVE_DUE)
        self.length = Script(client, LENGTH)
        self.requeue = Script(client, REQUEUE)
        self.tidy = Script(client, TIDY)
