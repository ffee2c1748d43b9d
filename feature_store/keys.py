"""The key layout of one namespace and the Lua scripts that compute keys on the server.

``ns`` = ``<key_prefix>:<namespace>`` (docs/feature_store.md, "Key layout")::

    ns:active                  version number currently served
    ns:next_version            INCR counter handing out version numbers
    ns:loading:<v>             marker (with TTL) while a bulk load writes version v
    ns:v<v>:meta               JSON: schema, counts, source; written last, before the flip
    ns:v<v>:u:<user_id>        user profile row          (codec kind U)
    ns:v<v>:s:<seq>:<user_id>  behaviour sequence        (codec kind S)
    ns:v<v>:i:<item_id>        item row                  (codec kind I)

Every key name is built here. The part after ``ns:v<v>:`` is a *suffix* (``user_suffix`` and
friends): the Lua scripts receive ``ns`` and a suffix and insert the version that is active when
they run.

On Redis Cluster (``tagged``) a user's keys carry the hash tag ``{u:<user_id>}`` and an item's
``{i:<item_id>}``, so every key of one user hashes to one slot (one MGET, one Lua script) whatever
the version, and items spread over the slots::

    ns:v<v>:{u:<user_id>}          user profile
    ns:v<v>:s:<seq>:{u:<user_id>}  behaviour sequence
    ns:v<v>:{i:<item_id>}          item row

``user_tag`` is the one place that decides a user's tag: per-user keys of any feature build on it.
Single-node keys stay untagged, so data loaded before cluster support reads unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

USER, SEQUENCE, ITEM = "u:", "s:", "i:"

# The key under the version that is active when the script runs (so a write never lands in a
# half-loaded version). KEYS[1] = ns:active; ARGV[1] = ns, ARGV[2] = key suffix.
_LUA_ACTIVE_KEY = """
local ver = redis.call('GET', KEYS[1])
if not ver then return redis.error_reply('NOACTIVE no active version') end
local key = ARGV[1] .. ':v' .. ver .. ':' .. ARGV[2]
"""

# Prepend one event to the sequence at ``key`` and keep the newest ARGV[5] events, atomically.
# ARGV = ns, key suffix, codec header, event bytes, max events.
_LUA_APPEND_BODY = """
local hdr, ev = ARGV[3], ARGV[4]
local cur = redis.call('GET', key)
local body = ''
if cur then
  if string.sub(cur, 1, #hdr) ~= hdr or (#cur - #hdr) % #ev ~= 0 then
    return redis.error_reply('CORRUPT ' .. key)
  end
  body = string.sub(cur, #hdr + 1)
end
local new = ev .. body
local cap = tonumber(ARGV[5]) * #ev
if #new > cap then new = string.sub(new, 1, cap) end
redis.call('SET', key, hdr .. new)
return math.floor(#new / #ev)
"""
#: single node: the append under the active version, KEYS[1] = ns:active
LUA_APPEND = _LUA_ACTIVE_KEY + _LUA_APPEND_BODY
#: Redis Cluster: the pointer lives in another slot, so the caller resolves the key (one slot:
#: the user's) and passes it as KEYS[1]; ARGV as for LUA_APPEND
LUA_APPEND_AT = "local key = KEYS[1]\n" + _LUA_APPEND_BODY

# SET one value under the active version. KEYS[1] = ns:active; ARGV = ns, key suffix, value.
LUA_SET_ACTIVE = _LUA_ACTIVE_KEY + """
redis.call('SET', key, ARGV[3])
return ver
"""

# Flip the active pointer to ARGV[1] unless a newer version is already active; returns the active one.
LUA_FLIP = """
local cur = tonumber(redis.call('GET', KEYS[1]) or '0')
if tonumber(ARGV[1]) > cur then
  redis.call('SET', KEYS[1], ARGV[1])
  return tonumber(ARGV[1])
end
return cur
"""


def user_tag(user_id: str) -> str:
    """The hash tag of every key of one user on Redis Cluster (never empty, so never ignored)."""
    return "{u:" + user_id + "}"


def user_suffix(user_id: str, tagged: bool = False) -> str:
    return user_tag(user_id) if tagged else USER + user_id


def sequence_suffix(sequence: str, user_id: str, tagged: bool = False) -> str:
    return f"{SEQUENCE}{sequence}:{user_tag(user_id) if tagged else user_id}"


def item_suffix(item_id: str, tagged: bool = False) -> str:
    return "{i:" + item_id + "}" if tagged else ITEM + item_id


def glob_escape(text: str) -> str:
    """``text`` as a literal inside a SCAN ``MATCH`` pattern."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


class VersionKeys:
    """Key names of one version of a namespace (``ns:v<v>:...``); ``tagged``: the Cluster layout."""

    __slots__ = ("_close", "_item", "_user", "base", "meta", "tagged")

    def __init__(self, ns: str, version: int, tagged: bool = False):
        self.base = f"{ns}:v{version}:"
        self.meta = self.base + "meta"
        self.tagged = tagged
        self._user = self.base + ("{u:" if tagged else USER)
        self._item = self.base + ("{i:" if tagged else ITEM)
        self._close = "}" if tagged else ""

    def user(self, user_id: str) -> str:
        return self._user + user_id + self._close

    def sequence(self, sequence: str, user_id: str) -> str:
        return self.base + sequence_suffix(sequence, user_id, self.tagged)

    def item(self, item_id: str) -> str:
        return self._item + item_id + self._close

    def items(self, item_ids: Sequence[str]) -> list[str]:
        prefix, close = self._item, self._close
        return [prefix + item_id + close for item_id in item_ids]


class Keys:
    """Key names of one namespace; ``tagged``: the Redis Cluster layout (hash-tagged user and item keys)."""

    def __init__(self, prefix: str, namespace: str, tagged: bool = False):
        self.ns = f"{prefix}:{namespace}"
        self.tagged = tagged
        if tagged and ("{" in self.ns or "}" in self.ns):
            raise ValueError(f"key prefix and namespace {self.ns!r} must not contain '{{' or '}}' on Redis Cluster: "
                             "they would replace the per-user hash tag")
        self.active = f"{self.ns}:active"
        self.next_version = f"{self.ns}:next_version"
        #: SCAN pattern of every versioned key (``ns:v*``), the namespace's glob characters escaped
        self.scan_pattern = glob_escape(self.ns) + ":v*"
        self._version_head = f"{self.ns}:v"

    def version(self, version: int) -> VersionKeys:
        return VersionKeys(self.ns, version, self.tagged)

    def loading(self, version: int) -> str:
        return f"{self.ns}:loading:{version}"

    def meta(self, version: int) -> str:
        return VersionKeys(self.ns, version).meta

    def at(self, version: int, suffix: str) -> str:
        """The key of ``suffix`` (``user_suffix`` and friends) under ``version``."""
        return f"{self.ns}:v{version}:{suffix}"

    def version_of(self, key: bytes | str) -> int | None:
        """``ns:v<N>:...`` -> N (None for other keys of the namespace)."""
        text = key.decode() if isinstance(key, bytes) else key
        if not text.startswith(self._version_head):
            return None
        num = text[len(self._version_head):].split(":", 1)[0]
        return int(num) if num.isdigit() else None


# -- closed loop: impression log, click join, outcomes per arm (feature_store/feedback.py) ------
# Outside every namespace: ``<key_prefix>@fb`` (a namespace's keys all start ``<key_prefix>:``)::
#
#     fb:r:{<request_id>}               hash, TTL: user, experiment, arm, model, version, time and
#                                       ``s:<item>`` = the item's score bin; ``c:<item>`` once clicked
#     fb:e:{<request_id>}:<event_id>    marker, TTL: the event was counted (idempotent retries)
#     fb:log:<experiment>               stream (MAXLEN ~): one entry per logged scored request
#     fb:lab:<experiment>               stream (MAXLEN ~): one entry per joined event
#     fb:out:<experiment>:<arm>         hash: counters and score histograms of the arm's outcomes
#     fb:totals                         hash: events by result (accepted, duplicate, unknown_request, ...)
#
# The request id is the hash tag of its two keys; the outcome and stream keys are found from the
# request hash inside the event script, which therefore needs one node (like the store's scripts).

# One event, atomically: count it once, join it to its request, update the arm's outcomes, log
# it, and (first click on an impression) prepend the item to the user's sequence.
# KEYS[1] = request hash, KEYS[2] = event marker, KEYS[3] = totals, KEYS[4] = ns:active (clicks)
# ARGV = fb base, request id, event id, item id, type, ts, marker ttl, labels maxlen,
#        then for a click the sequence append's ARGV (ns, suffix, header, event, max events).
LUA_EVENT = "local function seq_append(KEYS, ARGV)\n" + LUA_APPEND + "\nend\n" + """
local base, rid, eid, item, kind = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
if redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('HINCRBY', KEYS[3], 'duplicate', 1)
  return 'duplicate'
end
local req = redis.call('HMGET', KEYS[1], 'e', 'a', 's:' .. item, 'c:' .. item)
local result = 'accepted'
if not req[1] then result = 'unknown_request' elseif not req[3] then result = 'unknown_item' end
if result == 'accepted' and kind == 'click' and not req[4] and #ARGV > 8 then
  local n = seq_append({KEYS[4]}, {ARGV[9], ARGV[10], ARGV[11], ARGV[12], ARGV[13]})
  if type(n) == 'table' and n.err then return n end
end
redis.call('SET', KEYS[2], 1, 'EX', ARGV[7])
redis.call('HINCRBY', KEYS[3], result, 1)
if result ~= 'accepted' then return result end
local out = base .. ':out:' .. req[1] .. ':' .. req[2]
if kind == 'click' then
  if req[4] then
    redis.call('HINCRBY', out, 'repeat_clicks', 1)
  else
    redis.call('HSET', KEYS[1], 'c:' .. item, 1)
    redis.call('HINCRBY', out, 'clicks', 1)
    redis.call('HINCRBY', out, 'p:' .. req[3], 1)
  end
else
  redis.call('HINCRBY', out, 'ev_' .. kind, 1)
end
redis.call('XADD', base .. ':lab:' .. req[1], 'MAXLEN', '~', ARGV[8], '*', 'request_id', rid, 'item_id', item,
           'type', kind, 'event_id', eid, 'ts', ARGV[6], 'arm', req[2])
return result
"""


class FeedbackKeys:
    """Key names of the closed loop (see the layout above)."""

    def __init__(self, prefix: str):
        self.base = f"{prefix}@fb"
        self.totals = f"{self.base}:totals"

    def request(self, request_id: str) -> str:
        return f"{self.base}:r:{{{request_id}}}"

    def event(self, request_id: str, event_id: str) -> str:
        return f"{self.base}:e:{{{request_id}}}:{event_id}"

    def log(self, experiment: str) -> str:
        return f"{self.base}:log:{experiment}"

    def labels(self, experiment: str) -> str:
        return f"{self.base}:lab:{experiment}"

    def outcomes(self, experiment: str, arm: str) -> str:
        return f"{self.base}:out:{experiment}:{arm}"
