"""Lua for queues with priorities, retention or a bound (see ``redis_layout``).

What waits in such a queue, per level stream: the entries after the group's last-delivered id
(on a retaining queue handled entries stay in the stream, so ``XLEN`` no longer says it),
plus entries released by a consumer (pending, idle for ages), plus delayed ones already due.
"""

from typing import Any

from .redis_scripts import _FIRST_TIME, RECORDS, Script

_WAITING = """
local function group_info(stream, group)
    local ok, groups = pcall(redis.call, 'XINFO', 'GROUPS', stream)
    if not ok then return nil end
    for _, g in ipairs(groups) do
        local info = {}
        for k = 1, #g, 2 do info[g[k]] = g[k + 1] end
        if info['name'] == group then return info end
    end
    return nil
end

-- Entries never delivered to the group, and where they start (an XRANGE start).
local function undelivered(stream, group, retaining)
    local info = group_info(stream, group)
    if not info then return redis.call('XLEN', stream), '-' end
    local start = '(' .. info['last-delivered-id']
    if retaining == '0' then  -- handled entries are deleted: the rest waits or is pending
        return redis.call('XLEN', stream) - info['pending'], start
    end
    if info['lag'] then return info['lag'], start end
    -- No lag after an undelivered entry was deleted (dropped, purged): count them.
    local n, from = 0, start
    while true do
        local page = redis.call('XRANGE', stream, from, '+', 'COUNT', 1000)
        n = n + #page
        if #page < 1000 then break end
        from = '(' .. page[#page][1]
    end
    return n, start
end

local function released(stream, group, idle)
    local n, start = 0, '-'
    local ok = pcall(redis.call, 'XPENDING', stream, group)
    if not ok then return 0 end
    while true do
        local page = redis.call('XPENDING', stream, group, 'IDLE', tonumber(idle) / 2,
                                start, '+', 1000)
        n = n + #page
        if #page < 1000 then break end
        start = '(' .. page[#page][1]
    end
    return n
end

-- streams: the level streams; delayed: the delayed set.
local function waiting(streams, delayed, group, now, idle, retaining)
    local n = redis.call('ZCOUNT', delayed, '-inf', now)
    for _, stream in ipairs(streams) do
        n = n + undelivered(stream, group, retaining) + released(stream, group, idle)
    end
    return n
end
"""

_IDS = """
local function id_parts(id)
    local dash = string.find(id, '-', 1, true)
    return tonumber(string.sub(id, 1, dash - 1)), tonumber(string.sub(id, dash + 1))
end

local function id_less(a, b)
    local am, as = id_parts(a)
    local bm, bs = id_parts(b)
    return am < bm or (am == bm and as < bs)
end
"""

# Entries of a queue with priorities take ids from the queue's clock (a string key holding
# the last id given), so the ids of all its level streams are in one order: the order the
# entries were added (history, drop_oldest). Other streams take Redis' own ids.
_CLOCK = """
local clocks, clock_of = {}, {}
local function add(key, ...)
    local clock = clock_of[key]
    if clock == nil then return redis.call('XADD', key, '*', ...) end
    local c = clocks[clock]
    if c == nil then
        local t = redis.call('TIME')
        c = {tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000), -1}
        local last = redis.call('GET', clock)
        if last then
            local lm, ls = id_parts(last)
            if lm >= c[1] then c = {lm, ls} end
        end
        clocks[clock] = c
    end
    c[2] = c[2] + 1
    local ok, added = pcall(redis.call, 'XADD', key, string.format('%.0f-%.0f', c[1], c[2]), ...)
    if not ok then  -- a newer entry came another way (a foreign producer): Redis' own id
        added = redis.call('XADD', key, '*', ...)
        c[1], c[2] = id_parts(added)
    end
    redis.call('SET', clock, string.format('%.0f-%.0f', c[1], c[2]))
    return added
end
"""

# Delete the oldest never-delivered entries over all levels until at most max wait (never a
# pending one: it is being handled, or released and owed a delivery).
_DROP_OLDEST = """
local function drop_oldest(q, group, now, idle)
    local excess = waiting(q.streams, q.delayed, group, now, idle, q.retaining) - q.max
    if excess <= 0 then return end
    local heads, pos = {}, {}
    for s, stream in ipairs(q.streams) do
        local _, start = undelivered(stream, group, '0')
        heads[s] = redis.call('XRANGE', stream, start, '+', 'COUNT', excess)
        pos[s] = 1
    end
    for _ = 1, excess do
        local best = nil
        for s = 1, #heads do
            local e = heads[s][pos[s]]
            if e and (best == nil or id_less(e[1], heads[best][pos[best]][1])) then best = s end
        end
        if best == nil then return end
        redis.call('XDEL', q.streams[best], heads[best][pos[best]][1])
        pos[best] = pos[best] + 1
    end
end
"""

# PUBLISH for batches that reach a queue with priorities, retention or a bound: each bound is
# checked before anything is written, so a batch that does not fit stores nothing anywhere.
# KEYS: mark, then the target keys. ARGV: bit, now ms, idle of a released entry, group,
# number of bounded queues, then per bounded queue: name, max_length, overflow, messages it
# receives now (delayed ones count once due), retaining (1/0), delayed set's key index,
# n, n level stream key indexes; then the number of clocks, per clock: its key index, n,
# n level stream key indexes; then PUBLISH's records.
PUBLISH_CHECKED = _FIRST_TIME + _WAITING + _IDS + _DROP_OLDEST + _CLOCK + """
if redis.call('GETBIT', KEYS[1], ARGV[1]) == 1 then return 0 end
local group, now, idle = ARGV[4], ARGV[2], ARGV[3]
local bounded = {}
local i = 6
for _ = 1, tonumber(ARGV[5]) do
    local q = {name = ARGV[i], max = tonumber(ARGV[i + 1]), overflow = ARGV[i + 2],
               incoming = tonumber(ARGV[i + 3]), retaining = ARGV[i + 4],
               delayed = KEYS[tonumber(ARGV[i + 5])], streams = {}}
    local n = tonumber(ARGV[i + 6])
    for j = 1, n do q.streams[j] = KEYS[tonumber(ARGV[i + 6 + j])] end
    i = i + 7 + n
    if q.overflow == 'reject' and q.incoming > 0
            and waiting(q.streams, q.delayed, group, now, idle, q.retaining) + q.incoming > q.max then
        return redis.error_reply('QUEUEFULL ' .. q.name)
    end
    bounded[#bounded + 1] = q
end
local clock_count = tonumber(ARGV[i])
i = i + 1
for _ = 1, clock_count do
    local n = tonumber(ARGV[i + 1])
    for j = 1, n do clock_of[KEYS[tonumber(ARGV[i + 1 + j])]] = KEYS[tonumber(ARGV[i])] end
    i = i + 2 + n
end
first_time(KEYS[1], ARGV[1])
""" + RECORDS.replace('{XADD}', 'add') + """
for _, q in ipairs(bounded) do
    if q.overflow == 'drop_oldest' then drop_oldest(q, group, now, idle) end
end
return 1
"""

_MOVE = """
local function move_due(delayed, by_level, now, most)
    local due = redis.call('ZRANGEBYSCORE', delayed, '-inf', now, 'LIMIT', 0, most)
    for _, member in ipairs(due) do
        local fields = cjson.decode(member)
        local key = by_level[1]
        for i = 1, #fields, 2 do
            if fields[i] == 'priority' then
                key = by_level[math.min(1 + (tonumber(fields[i + 1]) or 0), #by_level)]
            end
        end
        add(key, unpack(fields))
    end
    for i = 1, #due, 1000 do
        redis.call('ZREM', delayed, unpack(due, i, math.min(i + 999, #due)))
    end
    return #due
end
"""

# Move due delayed members into the stream of their priority level (their ``priority``
# field; level 0 without one). KEYS: zset, the queue's clock, then the level streams.
# ARGV: now (ms), most.
MOVE_DUE_LEVELS = _IDS + _CLOCK + _MOVE + """
for k = 3, #KEYS do clock_of[KEYS[k]] = KEYS[2] end
return move_due(KEYS[1], {unpack(KEYS, 3)}, ARGV[1], ARGV[2])
"""

# Move what is due from the delayed set (as the mover does: a fetch sees what length counts),
# then read up to ARGV[3] entries never delivered, highest level first (XREADGROUP COUNT is
# per stream: one command over all levels could return more than asked). KEYS: the delayed
# set, the queue's clock (ARGV[5] = '1'; else no such key), then the level streams, highest
# first. ARGV: group, consumer, most, now ms, clock?, most to move. Returns
# {1, {{k, entries}...}} (k: index among the streams), or, when none, {0, ids}: each level's
# last-delivered id, to wait on with XREAD.
FETCH_LEVELS = _WAITING + _IDS + _CLOCK + _MOVE + """
local first = ARGV[5] == '1' and 3 or 2
local streams = {unpack(KEYS, first)}
local by_level = {}
for k = #streams, 1, -1 do by_level[#by_level + 1] = streams[k] end
if first == 3 then
    for _, stream in ipairs(streams) do clock_of[stream] = KEYS[2] end
end
move_due(KEYS[1], by_level, ARGV[4], ARGV[6])
local out, left = {}, tonumber(ARGV[3])
for k, stream in ipairs(streams) do
    if left <= 0 then break end
    local r = redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', left,
                         'STREAMS', stream, '>')
    if r and #r[1][2] > 0 then
        out[#out + 1] = {k, r[1][2]}
        left = left - #r[1][2]
    end
end
if #out > 0 then return {1, out} end
local ids = {}
for k, stream in ipairs(streams) do
    local info = group_info(stream, ARGV[1])
    ids[k] = info and info['last-delivered-id'] or '0-0'
end
return {0, ids}
"""

# CLAIM (redis_scripts) over every level, highest first, up to ARGV[4] entries in all.
# KEYS: the level streams, highest first. Returns {k, id, fields, deliveries, state}.
CLAIM_LEVELS = """
local out, left = {}, tonumber(ARGV[4])
for k, stream in ipairs(KEYS) do
    if left <= 0 then break end
    local pending = redis.call('XPENDING', stream, ARGV[1], 'IDLE', ARGV[3], '-', '+', left)
    for _, p in ipairs(pending) do
        local claimed = redis.call('XCLAIM', stream, ARGV[1], ARGV[2], ARGV[3], p[1])
        local entry = claimed[1]
        if entry and entry[2] then
            local state = 0
            if p[3] >= tonumber(ARGV[5]) then
                state = 2
            elseif p[2] == ARGV[2] then
                state = 1
            end
            out[#out + 1] = {k, entry[1], entry[2], p[4], state}
            left = left - 1
        else
            redis.call('XACK', stream, ARGV[1], p[1])
        end
    end
end
return out
"""

# Messages waiting. KEYS: delayed set, then the level streams. ARGV: group, now ms, idle of a
# released entry, retaining (1/0).
LENGTH_LEVELS = _WAITING + """
local streams = {unpack(KEYS, 2)}
return waiting(streams, KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4])
"""

# Trim what a retaining queue keeps: entries older than the retention (by stream id, the
# server's clock), never one not yet handled: the bound is also at most the oldest pending
# entry and just past the group's last-delivered one. KEYS: the level streams.
# ARGV: group, retention ms. Returns how many entries went.
TRIM = _WAITING + _IDS + """
local t = redis.call('TIME')
local horizon = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) - tonumber(ARGV[2])
local trimmed = 0
for _, stream in ipairs(KEYS) do
    local info = group_info(stream, ARGV[1])
    if info then  -- without a group nothing was ever handled
        local ms, seq = id_parts(info['last-delivered-id'])
        seq = seq + 1
        if horizon < ms or (horizon == ms and seq > 0) then ms, seq = horizon, 0 end
        local summary = redis.call('XPENDING', stream, ARGV[1])
        if summary[1] > 0 then
            local pm, ps = id_parts(summary[2])
            if pm < ms or (pm == ms and ps < seq) then ms, seq = pm, ps end
        end
        trimmed = trimmed + redis.call('XTRIM', stream, 'MINID', string.format('%.0f-%.0f', ms, seq))
    end
end
return trimmed
"""


class LevelScripts:
    """These scripts, registered on one client."""

    def __init__(self, client: Any) -> None:
        self.publish_checked = Script(client, PUBLISH_CHECKED)
        self.move_due_levels = Script(client, MOVE_DUE_LEVELS)
        self.length_levels = Script(client, LENGTH_LEVELS)
        self.trim = Script(client, TRIM)
        self.fetch_levels = Script(client, FETCH_LEVELS)
        self.claim_levels = Script(client, CLAIM_LEVELS)
