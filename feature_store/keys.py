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
