"""Users' Sieve filters (RFC 5228): the script parsed by sievelib, run here, at delivery.

The parser is sievelib's (a well-kept library, also the ManageSieve client
of the tests); no Python library runs a script, so the interpreter is ours:
`Script.run` walks sievelib's command tree for one message and returns a
`Result`, the actions to take.  It takes none itself: the MDA stores, refuses
or sends (mda/rules.py), so running a script has no side effects and a test
can run one on a message in memory.

What a script may use (the `require` names; anything else is an error):

    fileinto (RFC 5228), envelope (RFC 5228), reject and ereject (RFC 5429),
    vacation (RFC 5230), imap4flags (RFC 5232; the system flags \\Seen,
    \\Answered, \\Flagged, \\Deleted, \\Draft), body (RFC 5173), variables
    (RFC 5229), copy (RFC 3894), mailbox (RFC 5490: fileinto :create;
    folders are created anyway), comparator-i;octet, comparator-i;ascii-casemap.

Dovecot's ManageSieve is told the same list (cli/dovecot.py), so it refuses to
store a script using anything else.  Matching: :is, :contains and :matches
(not :regex, nor the relational :count and :value); address parts :all,
:localpart and :domain.

Errors.  A script that cannot be parsed, or fails while running, never costs
mail: the result is the implicit keep alone (RFC 5228 2.10.6), and the MDA
reports the error.  Limits keep a hostile script cheap: at most MAX_ACTIONS
actions and MAX_REDIRECTS redirects per message (Pigeonhole's defaults), at
most MAX_WILDCARDS wildcards in a :matches key, and header and body text
looked at only up to MAX_TEXT characters.
"""

from __future__ import annotations

import contextlib
import email
import email.base64mime
import email.charset
import email.errors
import email.feedparser
import email.header
import email.message
import email.parser
import email.policy
import email.quoprimime
import email.utils
import hashlib
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sievelib import commands as sc
from sievelib.parser import Parser

from common.numbers import decimal

# What `require` may name.
CAPABILITIES = (
    "fileinto", "envelope", "reject", "ereject", "vacation", "imap4flags", "body", "variables", "copy",
    "mailbox", "comparator-i;octet", "comparator-i;ascii-casemap",
)
MAX_ACTIONS = 32
MAX_REDIRECTS = 4
MAX_WILDCARDS = 16
MAX_TEXT = 100_000
SYSTEM_FLAGS = {"\\seen": "\\Seen", "\\answered": "\\Answered", "\\flagged": "\\Flagged",
                "\\deleted": "\\Deleted", "\\draft": "\\Draft"}
# RFC 5230 4.1: :days at least 1; we keep the memory at most a year.
VACATION_DAYS = (1, 7, 365)


class ErejectCommand(sc.ActionCommand):  # type: ignore[misc]
    """ereject (RFC 5429 2.1): refuse in the protocol; sievelib has only reject."""

    extension = "ereject"
    args_definition = [{"name": "text", "type": ["string"], "required": True}]


sc.add_commands(ErejectCommand)


class ScriptError(Exception):
    """The script cannot be parsed, needs what we lack, or failed while running."""


@dataclass(frozen=True)
class FileInto:
    folder: str
    flags: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Vacation:
    reason: str
    days: int = VACATION_DAYS[1]
    seconds: int | None = None
    subject: str = ""
    from_: str = ""
    addresses: tuple[str, ...] = ()
    handle: str = ""
    mime: bool = False


@dataclass
class Result:
    """What to do with the message for this user."""

    keep: bool = True  # the implicit keep (or an explicit keep): store in the default folder
    keep_flags: frozenset[str] = frozenset()
    fileinto: list[FileInto] = field(default_factory=list)
    redirects: list[str] = field(default_factory=list)
    reject: str | None = None
    ereject: bool = False
    vacation: Vacation | None = None
    error: str = ""  # the script failed: only the implicit keep is left

    @classmethod
    def failed(cls, error: str) -> Result:
        return cls(error=error)


@dataclass(frozen=True)
class Envelope:
    sender: str  # "" for <>
    recipient: str


class Message:
    """The parts of one message a script looks at, parsed once."""

    def __init__(self, content: bytes) -> None:
        self.content = content
        self.size = len(content)
        self._parsed: email.message.Message | None = None
        self._headers: dict[str, list[str]] = {}

    @property
    def _msg(self) -> email.message.Message:
        # Parsed when a script first looks: most users have no script, and parsing
        # every delivered message for nothing cost the MDA a few per cent of its time.
        if self._parsed is None:
            self._parsed = email.message_from_bytes(self.content[: MAX_TEXT * 4], policy=email.policy.compat32)
        return self._parsed

    def header(self, name: str) -> list[str]:
        """Every value of field `name`, unfolded and with RFC 2047 words decoded."""
        key = name.lower()
        if key not in self._headers:
            self._headers[key] = [_decode(v)[:MAX_TEXT] for v in self._msg.get_all(name, [])]
        return self._headers[key]

    def body(self, transform: str, types: list[str]) -> list[str]:
        """The body as RFC 5173 sees it: :raw (undecoded), :text or :content (the decoded parts)."""
        if transform == ":raw":
            head_end = re.search(rb"\r?\n\r?\n", self.content)
            raw = self.content[head_end.end():] if head_end else b""
            return [raw[:MAX_TEXT].decode("utf-8", "replace")]
        wanted = ["text"] if transform == ":text" else [t.lower() for t in types]
        out = []
        for part in self._msg.walk():
            if part.is_multipart():
                continue
            ctype = part.get_content_type()
            if not any(w == "" or ctype == w or ctype.split("/")[0] == w for w in wanted):
                continue
            payload = part.get_payload(decode=True)
            if isinstance(payload, bytes):
                charset = part.get_content_charset() or "utf-8"
                try:
                    out.append(payload[:MAX_TEXT].decode(charset, "replace"))
                except LookupError:
                    out.append(payload[:MAX_TEXT].decode("utf-8", "replace"))
        return out


def _decode(value: Any) -> str:
    text = str(value)
    with contextlib.suppress(ValueError, LookupError, email.errors.HeaderParseError):
        text = str(email.header.make_header(email.header.decode_header(text)))
    return " ".join(text.replace("\r", "").split("\n")).strip() if "\n" in text else text.strip()


# --- parsing -------------------------------------------------------------------------

_parse_lock = threading.Lock()


def compile_script(text: bytes) -> Script:
    """Parse `text`; ScriptError when it is not a script we can run."""
    # sievelib keeps its parsing state per thread; one parse at a time keeps it simple.
    with _parse_lock:
        parser = Parser()
        try:
            ok = parser.parse(text)
        except Exception as exc:  # sievelib raises its own errors and the odd ValueError
            raise ScriptError(f"cannot parse: {exc}") from None
        if not ok:
            raise ScriptError(str(getattr(parser, "error", "cannot parse")))
        commands = list(parser.result)
    required: set[str] = set()
    for cmd in commands:
        for node in cmd.walk():
            if node.name == "require":
                caps = node["capabilities"]
                for cap in caps if isinstance(caps, list) else [caps]:
                    name = _unquote(cap).lower()
                    if name not in CAPABILITIES:
                        supported = ", ".join(CAPABILITIES)
                        raise ScriptError(f"require {name!r}: not supported here (supported: {supported})")
                    required.add(name)
            mtype = node.arguments.get("match-type", "")
            if mtype in (":regex", ":count", ":value"):
                raise ScriptError(f"{node.name} {mtype}: not supported here")
            comp = node.extra_arguments.get("comparator") or node.arguments.get("comparator")
            known = ("i;octet", "i;ascii-casemap")
            if isinstance(comp, str) and comp.startswith('"') and _unquote(comp).lower() not in known:
                raise ScriptError(f"comparator {_unquote(comp)!r}: not supported here")
            if node.name in ("notify", "date", "currentdate", "environment"):
                raise ScriptError(f"{node.name}: not supported here")
    return Script(commands, required, hashlib.sha256(text).hexdigest())


class Script:
    def __init__(self, commands: list[sc.Command], required: set[str], digest: str) -> None:
        self.commands = commands
        self.required = required
        self.digest = digest

    def run(self, message: Message, envelope: Envelope) -> Result:
        """The actions for this message; on a runtime error, the implicit keep alone (with the error)."""
        run = _Run(self, message, envelope)
        try:
            run.block(self.commands)
        except _Stop:
            pass
        except ScriptError as exc:
            return Result.failed(str(exc))
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            return Result.failed(f"runtime error: {type(exc).__name__}: {exc}")
        return run.finish()


_cache: dict[Path, tuple[tuple[int, int, int, int], Script | ScriptError]] = {}
_cache_lock = threading.Lock()


def load(path: Path, *, max_size: int) -> Script | None:
    """The script at `path` (the user's active script), parsed once per version of the file;
    None when there is none.  ScriptError when it is too large or cannot be parsed."""
    try:
        st = path.stat()
    except (FileNotFoundError, NotADirectoryError):
        return None
    if st.st_size > max_size:
        raise ScriptError(f"the script is {st.st_size} bytes, more than the limit of {max_size}")
    key = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    with _cache_lock:
        cached = _cache.get(path)
    if cached is not None and cached[0] == key:
        found = cached[1]
    else:
        text = path.read_bytes()[: max_size + 1]
        if len(text) > max_size:
            raise ScriptError(f"the script is more than the limit of {max_size} bytes")
        try:
            found = compile_script(text)
        except ScriptError as exc:
            found = exc
        with _cache_lock:
            _cache[path] = (key, found)
    if isinstance(found, ScriptError):
        raise found
    return found


# --- running ------------------------------------------------------------------------


class _Stop(Exception):
    pass


def _unquote(value: str) -> str:
    """A sievelib string argument as its text: quoted ("..."), or multi-line (text: ... .)."""
    if value.startswith("text:"):
        lines = value.split("\n")[1:]
        if lines and lines[-1].rstrip("\r") == ".":
            lines = lines[:-1]
        return "\n".join(line[1:] if line.startswith("..") else line for line in (x.rstrip("\r") for x in lines))
    if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
        return re.sub(r"\\(.)", r"\1", value[1:-1], flags=re.DOTALL)
    return value


def _number(value: str) -> int:
    units = {"K": 1024, "M": 1024**2, "G": 1024**3}
    v = value.strip()
    if v and v[-1].upper() in units:
        return decimal(v[:-1]) * units[v[-1].upper()]
    return decimal(v)


_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*|[0-9]+)\}")


class _Run:
    """One run of a script over one message."""

    def __init__(self, script: Script, message: Message, envelope: Envelope) -> None:
        self.script = script
        self.msg = message
        self.env = envelope
        self.variables: dict[str, str] = {}
        self.matches: list[str] = []
        self.flags: set[str] = set()
        self.result = Result()
        self.actions = 0
        self.cancel_keep = False
        self.explicit_keep = False
        self.keep_flags: frozenset[str] | None = None

    # values
    def text(self, value: str) -> str:
        text = _unquote(value)
        if "variables" in self.script.required:
            def sub(m: re.Match[str]) -> str:
                name = m.group(1)
                if name.isdigit():
                    i = int(name)
                    return self.matches[i] if i < len(self.matches) else ""
                return self.variables.get(name.lower(), "")

            text = _VARIABLE.sub(sub, text)
        return text

    def texts(self, value: str | list[str]) -> list[str]:
        return [self.text(v) for v in (value if isinstance(value, list) else [value])]

    # control
    def block(self, cmds: list[sc.Command]) -> None:
        chain_taken = True
        for cmd in cmds:
            name = cmd.name
            if name == "require":
                continue
            if name == "if":
                chain_taken = self.test(cmd["test"])
                if chain_taken:
                    self.block(cmd.children)
            elif name == "elsif":
                if not chain_taken:
                    chain_taken = self.test(cmd["test"])
                    if chain_taken:
                        self.block(cmd.children)
            elif name == "else":
                if not chain_taken:
                    self.block(cmd.children)
                chain_taken = True
            else:
                self.action(cmd)

    # actions
    def count(self) -> None:
        self.actions += 1
        if self.actions > MAX_ACTIONS:
            raise ScriptError(f"more than {MAX_ACTIONS} actions")

    def action(self, cmd: sc.Command) -> None:
        name = cmd.name
        args = cmd.arguments
        extra = cmd.extra_arguments
        if name == "stop":
            raise _Stop
        if name == "keep":
            self.count()
            self.explicit_keep = True
            self.keep_flags = self._flag_arg(cmd)
        elif name == "discard":
            self.count()
            self.cancel_keep = True
        elif name == "fileinto":
            self.count()
            folder = self.text(args["mailbox"])
            self.result.fileinto.append(FileInto(folder, self._flag_arg(cmd)))
            if "copy" not in args:
                self.cancel_keep = True
        elif name == "redirect":
            self.count()
            address = self.text(args["address"]).strip()
            if not _valid_address(address):
                raise ScriptError(f"redirect to {address!r}: not an address")
            if address.lower() not in (r.lower() for r in self.result.redirects):
                self.result.redirects.append(address)
            if len(self.result.redirects) > MAX_REDIRECTS:
                raise ScriptError(f"more than {MAX_REDIRECTS} redirects")
            if "copy" not in args:
                self.cancel_keep = True
        elif name in ("reject", "ereject"):
            self.count()
            if self.result.reject is not None:
                raise ScriptError("reject twice")
            self.result.reject = self.text(args["text"])
            self.result.ereject = name == "ereject"
            self.cancel_keep = True
        elif name == "vacation":
            self.count()
            if self.result.vacation is not None:
                raise ScriptError("vacation twice (RFC 5230 4.7)")
            self.result.vacation = self._vacation(args, extra)
        elif name in ("setflag", "addflag", "removeflag"):
            flags = self._flags(self.texts(args["list-of-flags"]))
            var = args.get("variable-name")
            current = self.flags if var is None else set(self.variables.get(self.text(var).lower(), "").split())
            if name == "setflag":
                current = set(flags)
            elif name == "addflag":
                current |= flags
            else:
                current -= flags
            if var is None:
                self.flags = current
            else:
                self.variables[self.text(var).lower()] = " ".join(sorted(current))
        elif name == "set":
            self._set(args)
        else:
            raise ScriptError(f"{name}: not supported here")

    def _flags(self, values: list[str]) -> set[str]:
        out = set()
        for value in values:
            for word in value.split():
                flag = SYSTEM_FLAGS.get(word.lower())
                if flag is not None:
                    out.add(flag)  # keywords of the user's own are not stored (no keyword file)
        return out

    def _flag_arg(self, cmd: sc.Command) -> frozenset[str]:
        if "flags" in cmd.arguments:
            return frozenset(self._flags(self.texts(cmd.extra_arguments["flags"])))
        return frozenset(self.flags)

    def _vacation(self, args: dict[str, Any], extra: dict[str, Any]) -> Vacation:
        low, default, high = VACATION_DAYS
        days = default
        if "days" in args:
            days = min(max(_number(extra["days"]), low), high)
        seconds = _number(extra["seconds"]) if "seconds" in args else None
        reason = self.text(args["reason"])
        subject = self.text(extra["subject"]) if "subject" in args else ""
        from_ = self.text(extra["from"]) if "from" in args else ""
        addresses = tuple(self.texts(extra["addresses"])) if "addresses" in args else ()
        handle = self.text(extra["handle"]) if "handle" in args else ""
        if not handle:  # RFC 5230 4.2: the same reason, subject and from are the same vacation
            handle = hashlib.sha256(f"{reason}\0{subject}\0{from_}\0{'mime' in args}".encode()).hexdigest()[:32]
        return Vacation(reason, days, seconds, subject, from_, addresses, handle[:64], "mime" in args)

    _MODIFIERS = (":lower", ":upper", ":lowerfirst", ":upperfirst", ":quotewildcard", ":length")

    def _set(self, args: dict[str, Any]) -> None:
        name = self.text(args["name"]).lower()
        value = self.text(args["value"])
        # RFC 5229 4.1: applied from the highest precedence down.
        for key in ("case", "first-case", "quotewildcard", "length"):
            mod = args.get(key)
            if mod == ":lower":
                value = value.lower()
            elif mod == ":upper":
                value = value.upper()
            elif mod == ":lowerfirst":
                value = value[:1].lower() + value[1:]
            elif mod == ":upperfirst":
                value = value[:1].upper() + value[1:]
            elif mod == ":quotewildcard":
                value = re.sub(r"([*?\\])", r"\\\1", value)
            elif mod == ":length":
                value = str(len(value))
        self.variables[name] = value[:MAX_TEXT]

    # tests
    def test(self, cmd: sc.Command) -> bool:
        name = cmd.name
        args = cmd.arguments
        if name == "true":
            return True
        if name == "false":
            return False
        if name == "not":
            return not self.test(args["test"])
        if name == "allof":
            return all(self.test(t) for t in args["tests"])
        if name == "anyof":
            return any(self.test(t) for t in args["tests"])
        if name == "exists":
            return all(self.msg.header(h) for h in self.texts(args["header-names"]))
        if name == "size":
            limit = _number(args["limit"])
            return self.msg.size > limit if args["comparator"] == ":over" else self.msg.size < limit
        if name == "header":
            values = [v for h in self.texts(args["header-names"]) for v in self.msg.header(h)]
            return self.match(cmd, values)
        if name == "address":
            values = [
                _address_part(a, args.get("address-part", ":all"))
                for h in self.texts(args["header-list"])
                for _, a in email.utils.getaddresses(self.msg.header(h))
                if a
            ]
            return self.match(cmd, values)
        if name == "envelope":
            values = []
            for part in self.texts(args["header-list"]):
                part = part.lower()
                if part == "from":
                    value = self.env.sender
                elif part == "to":
                    value = self.env.recipient
                else:
                    continue
                if value or args.get("address-part", ":all") == ":all":
                    values.append(_address_part(value, args.get("address-part", ":all")) if value else "")
            return self.match(cmd, values)
        if name == "body":
            transform = args.get("body-transform", ":text")
            types = self.texts(cmd.extra_arguments["body-transform"]) if transform == ":content" else []
            return self.match(cmd, self.msg.body(transform, types), body=True)
        if name == "hasflag":
            var = args.get("variable-list")
            if var is not None:
                have = {f for v in self.texts(var) for f in self.variables.get(v.lower(), "").split()}
            else:
                have = set(self.flags)
            return self.match(cmd, sorted(have), keys=self.texts(args["list-of-flags"]))
        raise ScriptError(f"test {name}: not supported here")

    def match(self, cmd: sc.Command, values: list[str], *, keys: list[str] | None = None, body: bool = False) -> bool:
        args = cmd.arguments
        mtype = args.get("match-type", ":is")
        comp = cmd.extra_arguments.get("comparator")
        octet = comp is not None and _unquote(comp).lower() == "i;octet"
        keys = keys if keys is not None else self.texts(args["key-list"])
        if body and mtype == ":is":
            mtype = ":is"
        for value in values:
            v = value if octet else value.lower()
            for key in keys:
                k = key if octet else key.lower()
                if mtype == ":is" and v == k:
                    return True
                if mtype == ":contains" and k in v:
                    return True
                if mtype == ":matches":
                    found = _glob(key, value, octet)
                    if found is not None:
                        if "variables" in self.script.required:
                            self.matches = found
                        return True
        return False

    def finish(self) -> Result:
        r = self.result
        r.keep = self.explicit_keep or not self.cancel_keep
        r.keep_flags = self.keep_flags if self.keep_flags is not None else frozenset(self.flags)
        if r.reject is not None and (r.fileinto or r.redirects or self.explicit_keep):
            # RFC 5429 2.3: reject cannot go with keeping or sending the message on.
            return Result.failed("reject together with keep, fileinto or redirect")
        return r


def _address_part(address: str, part: str) -> str:
    local, at, domain = address.rpartition("@")
    if part == ":localpart":
        return local if at else address
    if part == ":domain":
        return domain if at else ""
    return address


def _valid_address(address: str) -> bool:
    if len(address) > 320 or any(c.isspace() or ord(c) < 0x20 for c in address):
        return False
    local, at, domain = address.rpartition("@")
    return bool(at and local and domain and "." in domain and "<" not in address and ">" not in address)


def _glob(pattern: str, value: str, octet: bool) -> list[str] | None:
    """RFC 5228 2.7.1 :matches: `*` any run, `?` one character, `\\` quotes; the match groups
    (RFC 5229 3.2: ${0} the whole value, ${1}... each wildcard) or None."""
    out = ["^"]
    wildcards = 0
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if c == "\\" and i + 1 < len(pattern):
            out.append(re.escape(pattern[i + 1]))
            i += 2
            continue
        if c == "*":
            out.append("(.*?)")
            wildcards += 1
        elif c == "?":
            out.append("(.)")
            wildcards += 1
        else:
            out.append(re.escape(c))
        i += 1
    if wildcards > MAX_WILDCARDS:
        raise ScriptError(f":matches key with more than {MAX_WILDCARDS} wildcards")
    out.append("$")
    m = re.match("".join(out), value, 0 if octet else re.IGNORECASE | re.DOTALL)
    if m is None:
        return None
    return [m.group(0), *[g or "" for g in m.groups()]]
